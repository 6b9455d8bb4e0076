"""Activation checkpointing of decoder blocks: none, selective (operator-level, as torchtitan's op SAC) or full."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import TypeVar

import torch
from torch.utils.checkpoint import CheckpointPolicy, checkpoint, create_selective_checkpoint_contexts

T = TypeVar("T")


def _save_list() -> set:
    """Operators whose outputs selective checkpointing keeps: matmuls and attention kernels (expensive to redo).

    Everything else in the block (RMSNorm, RoPE, SiLU * up, dtype casts, residual adds) is cheap per byte and is
    recomputed in backward; torchtitan's op-level SAC and Megatron's selective recompute make the same split.
    """
    aten = torch.ops.aten
    ops = {aten.mm.default, aten.addmm.default, aten.bmm.default, aten._scaled_dot_product_efficient_attention.default}
    for name in (
        "_scaled_dot_product_flash_attention",
        "_scaled_dot_product_cudnn_attention",
        "_scaled_dot_product_flash_attention_for_cpu",
    ):
        if hasattr(aten, name):
            ops.add(getattr(aten, name).default)
    flash = getattr(torch.ops, "flash_attn", None)  # flash-attn registers its kernels as torch custom ops (>= 2.7)
    for name in ("_flash_attn_forward", "_flash_attn_varlen_forward"):
        try:
            ops.add(getattr(flash, name).default)
        except (AttributeError, RuntimeError):
            pass
    return ops


@functools.cache
def _policy_ops() -> frozenset:
    return frozenset(_save_list())


def _selective_policy(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    return CheckpointPolicy.MUST_SAVE if op in _policy_ops() else CheckpointPolicy.PREFER_RECOMPUTE


def _selective_context():
    return create_selective_checkpoint_contexts(_selective_policy)


def run_block(fn: Callable[..., T], mode: str, *args: object) -> T:
    """fn(*args) under activation checkpointing `mode` (none | selective | full); none outside autograd. fn may
    return a tensor or a tuple of tensors (and Nones)."""
    if mode == "none" or not torch.is_grad_enabled():
        return fn(*args)
    if mode == "full":
        return checkpoint(fn, *args, use_reentrant=False)
    if mode == "selective":
        return checkpoint(fn, *args, use_reentrant=False, context_fn=_selective_context)
    raise ValueError(f"execution.activation_checkpointing={mode!r}: choose none, selective or full")
