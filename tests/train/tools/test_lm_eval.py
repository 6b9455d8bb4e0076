"""train.lm_eval: lm-evaluation-harness on a run's export, offline, with the shipped Korean task."""

from __future__ import annotations

import json

import pytest

from tests.helpers import run_module

pytestmark = pytest.mark.slow  # torchrun jobs: excluded by `make test-fast`

pytest.importorskip("lm_eval")


def test_korean_sentiment_task_runs_offline(trained_run):
    proc = run_module("train.lm_eval", f"run.dir={trained_run}", "tasks=[ko_nsmc_sentiment]", "limit=12")
    result = json.loads(proc.stdout.strip().splitlines()[-1])["ko_nsmc_sentiment"]
    assert result["n"] == 12 and result["metric"] == "acc" and 0.0 <= result["score"] <= 1.0
    saved = json.loads((trained_run / "lm_eval.json").read_text())
    assert saved["ko_nsmc_sentiment"]["score"] == result["score"]
    assert (trained_run / "hf" / "config.json").is_file()


def test_unknown_task_is_a_clear_error(trained_run):
    proc = run_module("train.lm_eval", f"run.dir={trained_run}", "tasks=[no_such_task]", check=False)
    assert proc.returncode == 2 and "unknown lm-eval task" in proc.stderr
