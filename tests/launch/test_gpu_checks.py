"""launch/gpu_checks.sh, the prepared one-GPU measurement script, run end to end on CPU with tiny shapes (SMOKE=1):
every step it takes on a GPU (bench, trainer, planner, curve, long sequences) runs and writes its results."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_gpu_checks_script_runs_every_part_on_cpu(tmp_path):
    env = {**os.environ, "SMOKE": "1", "PY": sys.executable}
    proc = subprocess.run(
        ["bash", "launch/gpu_checks.sh", str(tmp_path), "pairs,long"], cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    bench = [json.loads(x) for x in (tmp_path / "bench.jsonl").read_text().splitlines()]
    assert [b["model"] for b in bench] == ["tiny", "deepseek_tiny"]
    assert all(b["tokens_per_s"] > 0 and b["vocab_size"] == 8192 for b in bench)
    plans = [json.loads(x) for x in (tmp_path / "plan.jsonl").read_text().splitlines()]
    assert [p["gpus"] for p in plans] == [1, 1] and all(p["step_time_s"] > 0 for p in plans)
    table = (tmp_path / "pairs.md").read_text().splitlines()
    assert len(table) == 4 and table[2].startswith("| tiny |") and table[3].startswith("| deepseek_tiny |")
    for name in ("planner_check.txt", "planner_check_measured_curve.txt"):
        checks = [
            line
            for line in (tmp_path / name).read_text().splitlines()
            if line.startswith("# ") and "s/step, predicted" in line
        ]
        assert len(checks) == 4, name  # two bench records and two trainer runs
    assert (tmp_path / "cpu-measured.yaml").is_file()
    long = [json.loads(x) for x in (tmp_path / "long.jsonl").read_text().splitlines()]
    assert [(r["seq_len"], r["trained"]) for r in long] == [(256, True), (512, True)]
    assert all(r["peak_mem_gb"] > 0 and r["plan_mem_gb"] > 0 for r in long)
