"""How a job starts and stops, on real 2-process jobs (CPU, gloo): one run per run.dir, Ctrl-C saves and exits 0,
a config error is said once with exit status 2 and not retried, and workers die with their launcher (kill -9 of its
process group); the relaunch then logs each step once, with the losses of an uninterrupted run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers import REPO, losses, torchrun_pretrain, train_args

pytestmark = pytest.mark.slow  # torchrun jobs: excluded by `make test-fast`

LAUNCH = [sys.executable, "-m", "launch.run", "--standalone", "--nproc_per_node=2"]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_SILENT": "true"}


def start(launcher: list[str], args: list[str], **kw) -> subprocess.Popen:
    pipe = subprocess.PIPE
    return subprocess.Popen(launcher + ["-m", "train.pretrain", *args], cwd=REPO, env=ENV, stdout=pipe, stderr=pipe,
                            text=True, **kw)  # fmt: skip


def wait_for(proc: subprocess.Popen, done, what: str, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while not done():
        if time.time() > deadline or proc.poll() is not None:
            proc.kill()
            raise AssertionError(f"no {what} (rc {proc.poll()}): {proc.communicate()[1][-3000:]}")
        time.sleep(0.2)


def logged(run_dir: Path) -> int:
    return max(losses(run_dir), default=0) if (run_dir / "metrics.jsonl").is_file() else 0


def workers_of(run_dir: Path) -> list[int]:
    """Live processes whose command line names this run.dir (the launcher and its workers)."""
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                cmd = Path(f"/proc/{entry}/cmdline").read_bytes().decode(errors="replace")
                state = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[0]
            except OSError:
                continue
            if f"run.dir={run_dir}" in cmd and state != "Z":
                out.append(int(entry))
    return out


def test_second_launch_is_refused_naming_the_holder_and_ctrl_c_saves_with_exit_0(tiny_tokenizer, tiny_data, tmp_path):
    run_dir = tmp_path / "run"
    args = train_args(
        tiny_tokenizer, tiny_data, run_dir, "checkpoint.every_steps=0", "train.max_steps=100", "debug.step_sleep_s=1"
    )  # long enough for the second launch to meet the first
    first = start(LAUNCH, args)
    wait_for(first, lambda: logged(run_dir) >= 1, "logged step")
    holder = json.loads((run_dir / "run.lock").read_text())
    # The same command again, while the first runs: refused at once, one line, exit 2, the first is untouched.
    t0 = time.time()
    second = start(LAUNCH + ["--max-restarts=3"], args)
    out, err = second.communicate(timeout=300)
    combined = out + err
    errors = [line for line in combined.splitlines() if line.startswith("error:")]
    assert second.returncode == 2, combined[-3000:]
    assert len(errors) == 1 and "is in use by another run" in errors[0] and f"pid {holder['pid']}" in errors[0]
    assert "Traceback" not in combined and "ChildFailedError" not in combined
    print(f"second launch refused in {time.time() - t0:.1f} s")
    assert first.poll() is None
    # Ctrl-C to the launcher: every rank finishes its step, saves, exits 0; the launcher exits 0.
    first.send_signal(signal.SIGINT)
    out, err = first.communicate(timeout=180)
    assert first.returncode == 0, err[-3000:]
    assert "[preemption] SIGINT" in err and "Traceback" not in out + err
    stopped = int((run_dir / "checkpoints" / "latest").read_text().strip().split("_")[1])
    assert 1 <= stopped < 100 and logged(run_dir) == stopped  # saved at the step it stopped, not at the end
    assert not (run_dir / "run.lock").exists()  # released at the end of the launch


def test_config_error_under_torchrun_is_said_once_and_not_retried(tiny_tokenizer, tiny_data, tmp_path):
    args = train_args(tiny_tokenizer, tiny_data, tmp_path / "run")
    for bad, said in (("train.global_batch_tokens=500", "not a multiple of train.seq_len=64"),
                      ("model.d_modle=3", "d_modle")):  # fmt: skip
        proc = subprocess.run(LAUNCH + ["--max-restarts=3", "-m", "train.pretrain", *args, bad], cwd=REPO, env=ENV,
                              capture_output=True, text=True, timeout=300)  # fmt: skip
        combined = proc.stdout + proc.stderr
        errors = [line for line in combined.splitlines() if line.startswith("error:")]
        assert proc.returncode == 2, combined[-3000:]
        assert len(errors) == 1 and said in errors[0], combined[-3000:]
        assert "Traceback" not in combined and "ChildFailedError" not in combined


def test_kill_9_of_the_launchers_group_ends_the_workers_and_the_relaunch_logs_each_step_once(
    trained_run, tiny_tokenizer, tiny_data, tmp_path
):
    run_dir = tmp_path / "run"
    args = train_args(tiny_tokenizer, tiny_data, run_dir, "deepspeed.zero_stage=2", "logging.wandb.mode=offline")
    # Plain torchrun: the workers' own watch of their launcher does the work, whichever launcher started them.
    job = start(TORCHRUN, [*args, "debug.step_sleep_s=0.5"], start_new_session=True)
    wait_for(job, lambda: (run_dir / "checkpoints" / "latest").is_file() and logged(run_dir) >= 6, "step 6")
    assert len(workers_of(run_dir)) >= 3  # the launcher and two workers
    os.killpg(job.pid, signal.SIGKILL)
    job.communicate()
    deadline = time.time() + 5
    while workers_of(run_dir) and time.time() < deadline:
        time.sleep(0.1)
    assert workers_of(run_dir) == [], "workers outlived their launcher"
    killed_at = logged(run_dir)
    proc = torchrun_pretrain(*args)  # the same command: takes over the dead run's lock, resumes from step 5
    assert "took over" in proc.stderr and "has exited" in proc.stderr
    assert f"dropped {killed_at - 5} rows" in proc.stderr

    def steps(d: Path) -> list[int]:
        return [json.loads(line)["step"] for line in (d / "metrics.jsonl").read_text().splitlines()]

    assert steps(run_dir) == steps(trained_run)  # each logged step once, in order, as in an uninterrupted run
    assert losses(run_dir) == losses(trained_run)
    # W&B: the rewound attempt is its own run, grouped with the first (offline: no server-side rewind).
    runs = sorted((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(runs) == 2 and any("-s5-" in r.name for r in runs)
