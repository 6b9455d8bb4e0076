"""The efficiency options under DeepSpeed (2 ranks, gloo): chunked loss + selective checkpointing train the same."""

from __future__ import annotations

import math

import pytest

from tests.helpers import losses, run_module, torchrun_pretrain, train_args


@pytest.mark.slow
def test_chunked_loss_and_selective_checkpointing_match_default_run(trained_run, tiny_tokenizer, tiny_data, tmp_path):
    run_dir = tmp_path / "efficient"
    extra = ("model.loss_impl=chunked", "model.loss_chunk_size=100", "model.activation_checkpointing=selective")
    torchrun_pretrain(*train_args(tiny_tokenizer, tiny_data, run_dir, "deepspeed.zero_stage=2", *extra))
    ref, got = losses(trained_run), losses(run_dir)
    assert sorted(got) == sorted(ref)
    for step in ref:
        assert math.isclose(got[step], ref[step], rel_tol=1e-4), (step, got[step], ref[step])


@pytest.mark.slow
def test_chunked_loss_and_full_checkpointing_under_zero3(trained_run, tiny_tokenizer, tiny_data, tmp_path):
    """ZeRO-3 gathers the (tied) head weight for the loss through the head's module call; full recompute works."""
    run_dir = tmp_path / "zero3"
    extra = ("deepspeed.zero_stage=3", "model.loss_impl=chunked", "model.activation_checkpointing=full")
    torchrun_pretrain(*train_args(tiny_tokenizer, tiny_data, run_dir, *extra))
    ref, got = losses(trained_run), losses(run_dir)
    for step in ref:
        assert math.isclose(got[step], ref[step], rel_tol=1e-4), (step, got[step], ref[step])


def test_selective_checkpointing_with_zero3_is_refused(tiny_tokenizer, tiny_data, tmp_path):
    extra = ("deepspeed.zero_stage=3", "model.activation_checkpointing=selective")
    proc = run_module("train.pretrain", *train_args(tiny_tokenizer, tiny_data, tmp_path / "r", *extra), check=False)
    assert proc.returncode != 0
    assert "activation_checkpointing=selective does not work with deepspeed.zero_stage=3" in proc.stdout + proc.stderr
