"""Resume compatibility is equality of the architecture (ModelConfig) and the tokenizer (the expert-parallel degree
is a layout: test_reshard.py); checkpoints written before execution keys left `model` still resume."""

from __future__ import annotations

from dataclasses import asdict, replace
from pathlib import Path

import pytest

from model.config import ExecutionConfig, ModelConfig, MoEConfig
from train.checkpoint.compat import check_compatible, model_meta

WHERE = Path("ckpt")


def test_equal_architecture_resumes_whatever_the_name_and_execution():
    model = ModelConfig(name="a", vocab_size=64)
    meta = model_meta(model, "sha", ExecutionConfig(attn_backend="eager"))
    check_compatible(meta, replace(model, name="b"), "sha", WHERE)


def test_old_meta_with_execution_keys_in_model_resumes():
    model = ModelConfig(vocab_size=64, moe=MoEConfig(enabled=True))
    old = asdict(model)
    old.update(attn_backend="sdpa", loss_impl="torch", kernels="torch", activation_checkpointing="none")
    old["moe"].update(ep_size=2, gamma=1e-3, balance="aux_free", expert_impl="auto")
    check_compatible({"model": old, "tokenizer_sha256": "sha"}, model, "sha", WHERE)


def test_another_architecture_is_refused_naming_each_difference():
    model = ModelConfig(vocab_size=64)
    meta = model_meta(model, "sha")
    other = replace(model, d_model=128, rope_theta=5e5)
    with pytest.raises(ValueError, match=r"model.d_model: checkpoint 256, config 128; model.rope_theta"):
        check_compatible(meta, other, "sha", WHERE)
    with pytest.raises(ValueError, match="tokenizer sha256"):
        check_compatible(meta, model, "other", WHERE)
