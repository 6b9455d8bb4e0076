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
