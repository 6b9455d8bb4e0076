"""What one forward of the decoder returns."""

from __future__ import annotations

from typing import NamedTuple

import torch


class ModelOutput(NamedTuple):
    """Outputs of `Transformer.forward`; fields that do not apply are None.

    A NamedTuple rather than a dataclass: DeepSpeed ZeRO-3's module output hooks rebuild namedtuples. No total
    loss: weighting the parts is the trainer's (total = ce_loss + lambda * mtp_losses.mean() + alpha *
    aux_losses.sum()).
    """

    logits: torch.Tensor | None = None
    """(B, T, V) when called without labels, else None."""
    ce_loss: torch.Tensor | None = None
    """fp32 mean next-token cross-entropy of the main head over labels != -100, when labels are given."""
    aux_losses: torch.Tensor | None = None
    """(n, ) unweighted sequence-wise balance loss of each MoE layer that ran, in `moe_layers()` order; MoE models
    in training mode only. n = all MoE layers when labels are given (MTP blocks run), else the decoder's."""
    mtp_losses: torch.Tensor | None = None
    """(mtp.depth,) cross-entropy of each MTP depth; training mode with labels and mtp.depth > 0 only."""
    expert_loads: torch.Tensor | None = None
    """(n, E) float routed-token counts of each MoE layer that ran (no gradient), in `moe_layers()` order; MoE models,
    training and evaluation. n as for `aux_losses` (MTP blocks run in training mode with labels only)."""
