"""optim=muon checkpoints: the Muon momentum is saved with every checkpoint, a run stopped at step 5 and resumed
reproduces the uninterrupted run exactly, and a 2-rank ZeRO-2 checkpoint resumes resharded (1 rank ZeRO-1, 2 ranks
ZeRO-3) through DeepSpeed's universal checkpoint with the uninterrupted losses."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from tests.helpers import STEPS, run_module, stopped_at, train_args


def rows(run_dir: Path) -> dict[int, dict]:
    out = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        if "loss" in row:
            out[row["step"]] = row
    return out


def pretrain(nproc: int, *args: str):
    return run_module("torchrun", "--standalone", f"--nproc_per_node={nproc}", "-m", "train.pretrain", *args)


@pytest.fixture(scope="module")
def muon_run(tiny_tokenizer, tiny_data, tmp_path_factory) -> Path:
    """10 steps of a 2-rank ZeRO-2 Muon run, checkpoints at steps 5 and 10."""
    run_dir = tmp_path_factory.mktemp("muon") / "run"
    pretrain(2, *train_args(tiny_tokenizer, tiny_data, run_dir, "optim=muon", "checkpoint.keep_last=0"))
    return run_dir


@pytest.mark.slow
def test_momentum_is_checkpointed_and_resume_is_exact(muon_run, tiny_tokenizer, tiny_data, tmp_path):
    files = sorted((muon_run / "checkpoints" / "step_00000005").glob("*optim_states.pt"))
    assert len(files) == 2  # one ZeRO partition per rank
    sd = torch.load(files[0], weights_only=False)["optimizer_state_dict"]
    groups = sd["base_optimizer_state"]["param_groups"]
    muon = [i for i, g in enumerate(groups) if g["use_muon"]]
    assert muon and all(sd["base_optimizer_state"]["state"][i]["exp_avg"].abs().sum() > 0 for i in muon)
    run_dir = stopped_at(muon_run, tmp_path / "resumed", 5)
    pretrain(2, *train_args(tiny_tokenizer, tiny_data, run_dir, "optim=muon", "checkpoint.keep_last=0"))
    ref, got = rows(muon_run), rows(run_dir)
    assert sorted(got) == list(range(1, STEPS + 1))
    for step in range(6, STEPS + 1):
        assert got[step]["loss"] == ref[step]["loss"], (step, got[step]["loss"], ref[step]["loss"])


@pytest.mark.slow
@pytest.mark.parametrize("nproc,stage", [(1, 1), (2, 3)])
def test_resharded_resume(muon_run, tiny_tokenizer, tiny_data, tmp_path, nproc, stage):
    run_dir = stopped_at(muon_run, tmp_path / "reshard", 5)
    args = train_args(tiny_tokenizer, tiny_data, run_dir, "optim=muon", f"deepspeed.zero_stage={stage}")
    proc = pretrain(nproc, *args)
    assert "resumed from" in proc.stderr and "universal" in proc.stderr
    ref, got = rows(muon_run), rows(run_dir)
    for step in range(6, STEPS + 1):
        assert math.isclose(got[step]["loss"], ref[step]["loss"], rel_tol=1e-5), (step, got[step], ref[step])
