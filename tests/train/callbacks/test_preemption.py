"""Preemption: SIGTERM to the launcher (`launch.run`) makes every rank finish its step, save, and exit 0; the relaunch
continues exactly."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from tests.helpers import REPO, losses, torchrun_pretrain, train_args

pytestmark = pytest.mark.slow  # torchrun jobs: excluded by `make test-fast`


def test_sigterm_saves_and_resume_matches_uninterrupted(trained_run, tiny_tokenizer, tiny_data, tmp_path):
    run_dir = tmp_path / "preempted"
    args = train_args(tiny_tokenizer, tiny_data, run_dir, "deepspeed.zero_stage=2", "checkpoint.every_steps=0")
    slow = ["debug.step_sleep_s=0.5"]  # the signal must land mid-run; sleeping changes no loss
    cmd = [sys.executable, "-m", "launch.run", "--standalone", "--nproc_per_node=2", "-m", "train.pretrain"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_SILENT": "true"}
    pipe = subprocess.PIPE
    proc = subprocess.Popen(cmd + args + slow, cwd=REPO, env=env, stdout=pipe, stderr=pipe, text=True)
    deadline = time.time() + 300
    while not ((run_dir / "metrics.jsonl").is_file() and len(losses(run_dir)) >= 2):
        if time.time() > deadline:
            proc.kill()
            raise AssertionError(f"no two logged steps within 300 s: {proc.communicate()[1][-2000:]}")
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    assert "[preemption] SIGTERM" in stderr
    assert proc.returncode == 0 and "Traceback" not in stdout + stderr, stderr[-3000:]
    tag = (run_dir / "checkpoints" / "latest").read_text().strip()
    stopped = int(tag.split("_")[1])
    assert 2 <= stopped < 10 and max(losses(run_dir)) == stopped  # saved at the step it stopped, not at the end
    torchrun_pretrain(*args)  # the same command resumes from that checkpoint
    assert losses(run_dir) == losses(trained_run)
