"""Hydra sweeps (-m): every combination is its own 2-process torchrun job; a failed job does not stop the sweep."""

from __future__ import annotations

import json

import pytest

from tests.helpers import run_module, train_args

pytestmark = pytest.mark.slow  # torchrun jobs: excluded by `make test-fast`


def test_sweep_runs_each_job_and_reports_failures(tiny_tokenizer, tiny_data, tmp_path):
    sweep = tmp_path / "sweep"
    args = [a for a in train_args(tiny_tokenizer, tiny_data, tmp_path / "unused") if not a.startswith("run.dir=")]
    args = [a for a in args if not a.startswith(("train.max_steps", "train.micro_batch_size", "logging.wandb.mode"))]
    proc = run_module(
        "train.pretrain", "-m", *args, "train.max_steps=3", "logging.wandb.mode=offline",
        f"hydra.sweep.dir={sweep}", "train.micro_batch_size=2,3",  # 3 does not divide: that job fails
    )  # fmt: skip
    rows = [json.loads(line) for line in (sweep / "sweep_summary.jsonl").read_text().splitlines()]
    assert [r["status"] for r in rows] == ["ok", "failed"]
    assert "does not divide" in rows[1]["error"]
    assert "1 ok, 1 failed" in proc.stderr
    ok = sweep / "0"
    assert (ok / "metrics.jsonl").is_file() and (ok / "checkpoints" / "latest").is_file()
    cfg = (ok / "config.yaml").read_text()
    assert f"group: {sweep.name}" in cfg and "train.micro_batch_size=2" in cfg  # W&B group and override tags
