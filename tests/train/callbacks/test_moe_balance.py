"""MoE routing balance (issue 13, item 11): a layer whose violation stays high is named in the log once per
episode, and the shipped deepseek_tiny under ko_tiny stays balanced over a 100-step run."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from tests.helpers import run_module, train_args

DEEPSEEK = ("model=deepseek_tiny", "model.n_layers=3", "model.max_seq_len=256")


@pytest.mark.timeout(1800)
def test_lasting_violation_is_named_once_per_layer(tiny_tokenizer, tiny_data, tmp_path):
    """One process, 8 steps; a threshold every step exceeds (0.01) for 3 steps warns once per MoE layer, not every
    step; a threshold no step reaches (violation <= E/top_k - 1 = 3) never warns."""
    base = [a for a in train_args(tiny_tokenizer, tiny_data, tmp_path / "a") if a != "model=nano"] + list(DEEPSEEK)
    common = ["train.max_steps=8", "train.eval_every=0", "checkpoint.every_steps=0", "train.moe.warn_steps=3"]
    proc = run_module("train.pretrain", *base, *common, "train.moe.warn_violation=0.01", timeout=900)
    warnings = [line for line in proc.stderr.splitlines() if line.startswith("[moe] warning")]
    layers = [re.search(r": (\S+) has had routing violation", w)[1] for w in warnings]
    # deepseek_tiny with 3 layers: 1 dense, 2 MoE decoder layers, plus the MTP block's MoE.
    assert sorted(layers) == ["layers.1.mlp", "layers.2.mlp", "mtp.0.block.mlp"], warnings
    assert warnings and all("step 3:" in w and "train.moe.warn_violation=0.01 for 3 steps" in w for w in warnings)

    base = [a for a in train_args(tiny_tokenizer, tiny_data, tmp_path / "b") if a != "model=nano"] + list(DEEPSEEK)
    proc = run_module("train.pretrain", *base, *common, "train.moe.warn_violation=3.5", timeout=900)
    assert "[moe] warning" not in proc.stderr


def rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_deepseek_tiny_under_ko_tiny_stays_balanced_for_100_steps(tiny_tokenizer, tiny_data, tmp_path):
    """The issue's setting (2 ranks, the experiment's batch, learning rate and warmup) on the session's small data,
    100 steps; validation off and one checkpoint at the end to keep it cheap. With the shipped balancing the routing
    collapsed to 3.0 (every token of a layer on 2 of 8 experts) by step 10; it must end below 1.0 and keep learning."""
    run = tmp_path / "run"
    args = ["experiment=ko_tiny", "model=deepseek_tiny", f"tokenizer.path={tiny_tokenizer}", f"data.path={tiny_data}",
            f"run.dir={run}", "train.max_steps=100", "train.eval_every=0", "checkpoint.every_steps=0",
            "logging.wandb.mode=disabled", "logging.progress=false"]  # fmt: skip
    run_module("torchrun", "--standalone", "--nproc_per_node=2", "-m", "train.pretrain", *args, timeout=1700)
    r = rows(run)
    assert [x["step"] for x in r] == list(range(1, 101))
    violation = [x["moe_max_violation"] for x in r]
    loss = [x["loss"] for x in r]
    assert violation[-1] < 1.0 and sum(violation[-10:]) / 10 < 1.0, violation[-20:]
    assert sum(loss[-20:]) / 20 < sum(loss[-40:-20]) / 20 < sum(loss[:20]) / 20, loss
