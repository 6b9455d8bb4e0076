"""RUN_DIR/run.lock: a live holder (another real process) is named and refused; a dead or silent one is taken over
with a message; a restart of the same job takes its own lock back; rank 0's heartbeat keeps it fresh."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time

import pytest

from tests.helpers import REPO
from train.checkpoint.run_lock import LOCK_NAME, RunDirBusy, RunLock

HOLD = textwrap.dedent(
    """
    import sys, time
    from train.checkpoint.run_lock import RunLock
    lock = RunLock(sys.argv[1], stale_s=300)
    lock.acquire()
    print("held", flush=True)
    time.sleep(600)
    """
)


@pytest.fixture
def clean_env(monkeypatch):
    for key in ("SLURM_JOB_ID", "TORCHELASTIC_RUN_ID", "HANGANG_LAUNCHER_PID"):
        monkeypatch.delenv(key, raising=False)
    return monkeypatch


def hold(run_dir) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(run_dir)], cwd=REPO, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_live_holder_is_refused_by_name_then_taken_over_once_dead(tmp_path, clean_env):
    holder = hold(tmp_path)
    try:
        with pytest.raises(RunDirBusy) as err:
            RunLock(tmp_path).acquire()
        msg = str(err.value)
        assert f"pid {holder.pid}" in msg and socket.gethostname() in msg and "\n" not in msg
        assert f"run.dir={tmp_path} is in use by another run" in msg
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    said = []
    lock = RunLock(tmp_path, log=said.append)
    lock.acquire()  # same host, holder process gone: taken over at once, not after the stale timeout
    assert said and "took over" in said[0] and f"its process {holder.pid} on this host has exited" in said[0]
    assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == os.getpid()
    lock.release()
    assert not (tmp_path / LOCK_NAME).exists()


def test_a_stale_heartbeat_from_another_host_is_taken_over_a_fresh_one_is_not(tmp_path, clean_env):
    record = {"host": "node-17", "pid": 4242, "launcher_pid": 4200, "token": "x"}
    (tmp_path / LOCK_NAME).write_text(json.dumps(record))
    with pytest.raises(RunDirBusy, match="host node-17, pid 4242"):
        RunLock(tmp_path, stale_s=60).acquire()
    past = time.time() - 120
    os.utime(tmp_path / LOCK_NAME, (past, past))  # its holder stopped refreshing the heartbeat 2 minutes ago
    said = []
    lock = RunLock(tmp_path, stale_s=60, log=said.append)
    lock.acquire()
    assert "took over" in said[0] and "heartbeat is 120 s old (run.lock_stale_s=60)" in said[0]
    lock.release()


def test_a_restart_of_the_same_job_takes_its_lock_back(tmp_path, clean_env):
    # torchrun --max-restarts: the same launcher (alive: here, this process) started the holder.
    clean_env.setenv("TORCHELASTIC_RUN_ID", "job-a")
    clean_env.setenv("HANGANG_LAUNCHER_PID", str(os.getpid()))
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])  # a live pid, not ours
    try:
        record = {"host": socket.gethostname(), "pid": other.pid, "launcher_pid": os.getpid(),
                  "torchrun_id": "job-a", "token": "x"}  # fmt: skip
        (tmp_path / LOCK_NAME).write_text(json.dumps(record))
        said = []
        lock = RunLock(tmp_path, log=said.append)
        lock.acquire()
        assert "took back" in said[0]
        lock.release()
        (tmp_path / LOCK_NAME).write_text(json.dumps({**record, "torchrun_id": "job-b"}))  # another torchrun job
        with pytest.raises(RunDirBusy):
            RunLock(tmp_path).acquire()
    finally:
        other.kill()
        other.wait()
    # SLURM: the same job id (a requeue too) on another node.
    clean_env.setenv("SLURM_JOB_ID", "777")
    (tmp_path / LOCK_NAME).write_text(json.dumps({**record, "host": "node-3", "slurm_job_id": "777"}))
    lock = RunLock(tmp_path, log=lambda m: None)
    lock.acquire()
    lock.release()


def test_heartbeat_is_refreshed_and_release_keeps_a_lock_that_is_not_ours(tmp_path, clean_env):
    lock = RunLock(tmp_path, stale_s=0.5)  # refreshed every 0.05 s
    lock.acquire()
    past = time.time() - 10
    os.utime(tmp_path / LOCK_NAME, (past, past))
    time.sleep(0.4)
    assert time.time() - (tmp_path / LOCK_NAME).stat().st_mtime < 0.3  # the heartbeat thread touched it
    other = tmp_path / "other"
    other.write_text(json.dumps({"host": "node-9", "pid": 1, "token": "y"}))
    os.replace(other, tmp_path / LOCK_NAME)  # as a takeover does: atomically
    time.sleep(0.2)
    assert not lock.held  # the heartbeat saw it was taken
    lock.release()
    assert json.loads((tmp_path / LOCK_NAME).read_text())["token"] == "y"  # someone else's: left alone


def test_a_torn_lock_file_counts_as_stale(tmp_path, clean_env):
    (tmp_path / LOCK_NAME).write_text('{"host": "node-1", "pid": 12')  # a crash mid-write
    said = []
    lock = RunLock(tmp_path, log=said.append)
    lock.acquire()
    assert "took over" in said[0]
    lock.release()
