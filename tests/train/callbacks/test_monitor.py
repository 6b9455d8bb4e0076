"""SpeedMonitor: MFU is never logged above 1, and a real 2-process CPU run's MFU lies in (0, 1]."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from train.callbacks.base import StepResult
from train.callbacks.monitor import SpeedMonitor


def _steps(monitor: SpeedMonitor, n: int) -> list[dict]:
    out = []
    for step in range(1, n + 1):
        monitor.pre_step(step)
        metrics: dict = {}
        monitor.post_step(StepResult(step, 0, 1.0, 1e-3, True), metrics)
        out.append(metrics)
    return out


def _monitor(peak_flops: float) -> SpeedMonitor:
    monitor = SpeedMonitor(tokens_per_step=1024, flops_per_token=1e6, peak_flops=peak_flops, world_size=2,
                           base_mem_gb=0.0)  # fmt: skip
    monitor.trainer = SimpleNamespace(d=SimpleNamespace(is_main=True, device=torch.device("cpu")))
    return monitor


def test_an_impossible_mfu_is_logged_as_null_with_one_warning(capsys):
    rows = _steps(_monitor(peak_flops=1.0), 3)  # 1 FLOP/s: any step "exceeds" the peak
    assert [r["mfu"] for r in rows] == [None, None, None]
    assert all(r["tokens_per_s"] > 0 for r in rows)
    err = capsys.readouterr().err
    assert err.count("warning: MFU") == 1 and "train.peak_tflops" in err, err


def test_a_possible_mfu_is_logged(capsys):
    rows = _steps(_monitor(peak_flops=1e30), 2)
    assert all(0 < r["mfu"] <= 1 for r in rows)
    assert "warning" not in capsys.readouterr().err


@pytest.mark.slow
def test_two_process_cpu_run_logs_mfu_within_0_and_1(trained_run):
    rows = [json.loads(line) for line in (trained_run / "metrics.jsonl").read_text().splitlines()]
    mfus = [r["mfu"] for r in rows if "loss" in r]
    assert mfus and all(m is not None and 0 < m <= 1 for m in mfus), mfus
