"""The batch layout: global batch tokens -> sequence length x micro-batch x grad-accum x data-parallel size."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class BatchLayout:
    """One object owns the batch arithmetic; everything else reads it from here."""

    seq_len: int
    micro_batch_size: int
    grad_accum: int
    dp_size: int

    @property
    def global_batch_seqs(self) -> int:
        return self.micro_batch_size * self.grad_accum * self.dp_size

    @property
    def global_batch_tokens(self) -> int:
        return self.global_batch_seqs * self.seq_len


def make_layout(global_batch_tokens: int, seq_len: int, micro_batch_size: int, dp_size: int) -> BatchLayout:
    """Derive grad-accum steps; raise a ValueError naming the numbers and the fix when they do not divide."""
    if global_batch_tokens % seq_len:
        raise ValueError(
            f"train.global_batch_tokens={global_batch_tokens} is not a multiple of train.seq_len={seq_len}: "
            f"use a multiple such as {max(1, global_batch_tokens // seq_len) * seq_len}"
        )
    seqs = global_batch_tokens // seq_len
    per_step = micro_batch_size * dp_size
    if seqs % per_step:
        raise ValueError(
            f"global batch of {seqs} sequences (train.global_batch_tokens={global_batch_tokens} / "
            f"train.seq_len={seq_len}) does not divide into train.micro_batch_size={micro_batch_size} x "
            f"{dp_size} data-parallel ranks: make global_batch_tokens a multiple of "
            f"{per_step * seq_len} or change micro_batch_size"
        )
    return BatchLayout(seq_len, micro_batch_size, seqs // per_step, dp_size)


def check_ep_size(ep_size: int, world_size: int, n_experts: int, zero_stage: int) -> None:
    """Refuse an expert-parallel degree this job cannot run, before any process group exists."""
    if ep_size == 1:
        return
    if world_size % ep_size:
        raise ValueError(
            f"model.moe.ep_size={ep_size} must divide the number of ranks ({world_size}): each group of ep_size "
            "ranks holds one copy of all experts. Choose a divisor of the world size, or launch a multiple of it"
        )
    if n_experts % ep_size:
        raise ValueError(f"model.moe.ep_size={ep_size} must divide model.moe.n_routed_experts={n_experts}")
    if zero_stage == 0:
        raise ValueError(
            f"model.moe.ep_size={ep_size} with deepspeed.zero_stage=0: without ZeRO, DeepSpeed clips gradients by "
            "the mean of each rank's local norm, which misses the other ranks' expert shards, so clipped steps would "
            "differ from ep_size=1. Use deepspeed.zero_stage=1, 2 or 3 with ep_size > 1"
        )
