"""train.report: offline comparison of run directories, with plots and comparability notes."""

from __future__ import annotations

import shutil

import pytest
import yaml

from tests.helpers import run_module


@pytest.mark.slow
def test_report_compares_runs_and_flags_different_budgets(trained_run, tmp_path):
    other = tmp_path / "runs" / "longer"
    shutil.copytree(trained_run, other, ignore=shutil.ignore_patterns("checkpoints", "wandb"))
    cfg = yaml.safe_load((other / "config.yaml").read_text())
    cfg["train"]["max_steps"] = 20
    cfg["optim"]["lr"] = 0.002
    (other / "config.yaml").write_text(yaml.safe_dump(cfg))
    out = tmp_path / "report"
    run_module("train.report", str(trained_run), str(tmp_path / "runs"), f"out={out}")
    text = (out / "report.md").read_text()
    assert "| run | optim.lr | train.max_steps | final val | best val |" in text
    assert "val kowiki" in text and "tokens/s" in text and "MFU" in text and "wall s" in text
    assert "not comparable" in text and "token budget" in text
    for png in ("loss_by_step.png", "loss_by_tokens.png"):
        data = (out / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000


def test_report_without_runs_is_a_clear_error(tmp_path):
    proc = run_module("train.report", str(tmp_path), f"out={tmp_path / 'r'}", check=False)
    assert proc.returncode == 2 and "no run directories" in proc.stderr
