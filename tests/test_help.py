"""`python -m X --help` of every entry point prints usage specific to it (what it does, its main keys, an example),
not Hydra's generic listing of every config group, and exits 0."""

from __future__ import annotations

import pytest

from tests.helpers import run_module

# module -> keys its help must name
ENTRY_POINTS = {
    "train.pretrain": ["run.dir", "tokenizer.path", "data.path", "train.max_steps"],
    "train.evaluate": ["run.dir", "eval.text_files"],
    "train.export": ["run.dir", "out"],
    "train.bench": ["bench.seq_len", "bench.suite"],
    "train.report": ["runs", "out"],
    "train.lm_eval": ["run.dir", "tasks", "num_fewshot"],
    "train.summary": ["run", "hf", "eval"],
    "data_pipeline.prepare": ["data=NAME", "tokenizer.path", "out", "data.num_workers"],
    "data_pipeline.merge": ["data=NAME", "tokenizer.path", "out"],
    "data_pipeline.bom": ["path", "json"],
    "data_pipeline.bench": ["data=NAME", "tokenizer.path", "rounds"],
    "tokenizer.train": ["tokenizer=", "data=NAME", "out"],
    "tokenizer.evaluate": ["tokenizer.path", "eval.files"],
    "launch.plan": ["model=NAME", "gpus", "tokens", "mfu"],
}


@pytest.mark.parametrize("module", sorted(ENTRY_POINTS))
def test_help_is_specific_to_the_entry_point(module):
    proc = run_module(module, "--help", check=False, timeout=120)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert f"python -m {module}" in out or f"-m {module}" in out, out
    for key in ENTRY_POINTS[module]:
        assert key in out, (module, key, out)
    assert "Example" in out or "example" in out or module == "data_pipeline.bom", out
    assert "== Configuration groups ==" not in out and "bench_suite:" not in out, out  # not Hydra's generic page
    assert len(out.splitlines()) < 40, out
