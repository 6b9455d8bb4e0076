"""QK-clip (Kimi K2's MuonClip) and the `max_attn_logit` metric.

Each step, every attention module records the largest pre-softmax logit of each head over the step's micro-batches
(a tracker the model offers, off unless this component is registered); the maxima are all-reduced over the ranks
(`train.engine.muon.HeadMaxima`: under tensor parallelism a rank tracks and rescales its slice of the heads).
`max_attn_logit` (the largest over layers) and `max_attn_logit/LAYER` are logged. With clipping on, after an applied
update every head whose maximum exceeded tau has its query/key rows rescaled so that its logits shrink by
gamma = tau / max (`qk_clip_scales` of the attention module says which rows), in the model's weights and in ZeRO's
fp32 master copy (`train.engine.muon.row_scaler`). Heads under tau are not touched.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from model.attention import LogitTracker
from train.callbacks.base import Callback, StepResult
from train.config import QKClipConfig
from train.engine.muon import HeadMaxima


def clip_heads(module: LogitTracker, maxes: torch.Tensor, tau: float, scale_rows: Callable) -> int:
    """Rescale the heads of `module` whose maximum logit in `maxes` (nh,) exceeds tau; returns how many."""
    over = maxes > tau
    if not bool(over.any()):
        return 0
    gamma = torch.where(over, tau / maxes, torch.ones_like(maxes)).cpu()
    for param, rows in module.qk_clip_scales(gamma):
        scale_rows(param, rows)
    return int(over.sum())


class QKClip(Callback):
    def __init__(self, cfg: QKClipConfig, scale_rows: Callable, maxima: HeadMaxima | None = None) -> None:
        self.cfg, self.scale_rows = cfg, scale_rows
        self.maxima = maxima or HeadMaxima()
        self.modules: list[tuple[str, LogitTracker]] = []

    def pre_train(self) -> None:
        self.modules = []
        for name, module in self.trainer.engine.module.named_modules():
            if isinstance(module, LogitTracker):
                module.track_max_logit = True
                # layers.3.self_attn -> layers.3; mtp.0.block.self_attn -> mtp.0
                self.modules.append((".".join(name.split(".")[:2]), module))

    def pre_step(self, step: int) -> None:
        for _, module in self.modules:
            module.max_logit = None  # evaluation forwards since the last step do not count

    def post_step(self, result: StepResult, metrics: dict) -> None:
        if not self.modules:
            return
        device = next(self.trainer.engine.module.parameters()).device
        tracked = [m.max_logit for _, m in self.modules]
        # Every layer has this rank's number of heads (all of them, or a tensor-parallel slice); a layer that ran
        # no forward this step counts as -inf.
        width = next((t.numel() for t in tracked if t is not None), 0)
        if width == 0:
            return
        rows = [t.float().to(device) if t is not None else torch.full((width,), float("-inf"), device=device)
                for t in tracked]  # fmt: skip
        maxes, mine = self.maxima(torch.stack(rows))  # (layers, heads) every rank alike; (layers, this rank's)
        per_layer = maxes.amax(dim=1).tolist()
        metrics["max_attn_logit"] = max(per_layer)
        for (label, _), value in zip(self.modules, per_layer, strict=True):
            metrics[f"max_attn_logit/{label}"] = value
        if self.cfg.enabled and result.applied:
            for i, (_, m) in enumerate(self.modules):
                clip_heads(m, mine[i], self.cfg.tau, self.scale_rows)
            metrics["qk_clipped_heads"] = int((maxes > self.cfg.tau).sum())
