"""MoE routing balance (issue 13, item 11): a layer whose violation stays high is named in the log once per
episode, and the shipped deepseek_tiny under ko_tiny stays balanced over a 100-step run."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from tests.helpers import run_module, torchrun_pretrain, train_args

DEEPSEEK = ("model=deepseek_tiny", "model.n_layers=3", "model.max_seq_len=256")


def test_lasting_violation_is_named_once_per_layer(tiny_tokenizer, tiny_data, tmp_path):
    """One process, 8 steps; a threshold every step exceeds (0.01) for 3 steps warns once per MoE layer, not every
    step; a threshold no step reaches (violation <= E/top_k - 1 = 3) never warns."""
    base = [a for a in train_args(tiny_tokenizer, tiny_data, tmp_path / "a") if a != "model=nano"] + list(DEEPSEEK)
    common = ["train.max_steps=8", "train.eval_every=0", "checkpoint.every_steps=0", "train.moe.warn_steps=3"]
    proc = run_module("train.pretrain", *base, *common, "train.moe.warn_violation=0.01", timeout=300)
    warnings = [line for line in proc.stderr.splitlines() if line.startswith("[moe] warning")]
    layers = [re.search(r": (\S+) has had routing violation", w)[1] for w in warnings]
    # deepseek_tiny with 3 layers: 1 dense, 2 MoE decoder layers, plus the MTP block's MoE.
    assert sorted(layers) == ["layers.1.mlp", "layers.2.mlp", "mtp.0.block.mlp"], warnings
    assert warnings and all("step 3:" in w and "train.moe.warn_violation=0.01 for 3 steps" in w for w in warnings)

    base = [a for a in train_args(tiny_tokenizer, tiny_data, tmp_path / "b") if a != "model=nano"] + list(DEEPSEEK)
    proc = run_module("train.pretrain", *base, *common, "train.moe.warn_violation=3.5", timeout=300)
    assert "[moe] warning" not in proc.stderr
