"""`python -m train.bench` end to end on CPU: JSON summary on the last line, typos fail at compose time."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]
KEYS = {"device", "model", "params", "seq_len", "micro_batch_size", "tokens_per_s", "mfu", "peak_mem_gb"}


def run_bench(*overrides: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "train.bench", *overrides]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_bench_tiny_prints_summary():
    proc = run_bench("model=tiny", "bench.steps=2", "bench.warmup=1", "bench.seq_len=64", "bench.micro_batch_size=2")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    summary = json.loads(lines[-1])
    assert KEYS | {"peer", "speedup"} <= set(summary)
    assert KEYS <= set(summary["peer"])
    assert (summary["model"], summary["seq_len"], summary["micro_batch_size"]) == ("tiny", 64, 2)
    assert summary["params"] == summary["peer"]["params"]  # same network, tied head counted once
    assert summary["tokens_per_s"] > 0 and summary["mfu"] > 0 and summary["speedup"] > 0
    # Same initial weights and batch, fp32 on CPU: the first losses agree.
    assert abs(summary["first_loss"] - summary["peer"]["first_loss"]) < 1e-3
    assert [json.loads(line)["impl"] for line in lines[-3:-1]] == ["hangang", "transformers"]


def test_bench_unknown_key_fails():
    proc = run_bench("model=tiny", "bench.nonexistent=1")
    assert proc.returncode != 0
    assert "nonexistent" in proc.stdout + proc.stderr
