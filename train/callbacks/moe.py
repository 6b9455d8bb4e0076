"""Auxiliary-loss-free load balancing (DeepSeek-V3): after each applied update, every MoE layer's selection bias
moves toward balance by gamma * sign(mean load - load), from routed-token counts all-reduced over the ranks (so the
biases stay identical without a broadcast). As torchtitan's optimizer hook, but only for updates that ran.

It also watches for routing collapse: a layer whose violation stays above `train.moe.warn_violation` for
`warn_steps` steps in a row is named in the log, once per such episode."""

from __future__ import annotations

import sys

from model.moe import MoE, max_violation
from train.callbacks.base import Callback, StepResult
from train.config import BalanceConfig


class MoEBalance(Callback):
    def __init__(self, balance: BalanceConfig, max_steps: int) -> None:
        self.balance, self.max_steps = balance, max_steps
        self._over: dict[int, int] = {}
        """Consecutive steps each layer (row of expert_loads) has been above warn_violation."""

    def post_step(self, result: StepResult, metrics: dict) -> None:
        if result.expert_loads is None:
            return
        if result.applied:
            gamma = self.balance.gamma_at((result.step - 1) / self.max_steps)
            if gamma:
                for moe, load in zip(self.trainer.engine.module.moe_layers(), result.expert_loads, strict=True):
                    moe.gate.update_bias(load, gamma)
        metrics["moe_max_violation"] = max_violation(result.expert_loads)
        if self.balance.warn_violation > 0:
            self._watch(result)

    def _watch(self, result: StepResult) -> None:
        loads = result.expert_loads.float()
        violations = (loads.amax(-1) / loads.mean(-1).clamp_min(1e-9) - 1).tolist()
        for layer, v in enumerate(violations):
            self._over[layer] = self._over.get(layer, 0) + 1 if v > self.balance.warn_violation else 0
            if self._over[layer] == self.balance.warn_steps and self.trainer.d.is_main:
                print(f"[moe] warning: step {result.step}: {self._layer_name(layer)} has had routing violation above "
                      f"train.moe.warn_violation={self.balance.warn_violation:g} for {self.balance.warn_steps} steps "
                      f"(now {v:.2f}: its busiest expert gets {v + 1:.1f}x the mean load), its tokens are collapsing "
                      "onto few experts: raise train.moe.gamma or train.moe.seq_aux_alpha",
                      file=sys.stderr, flush=True)  # fmt: skip

    def _layer_name(self, row: int) -> str:
        names = [n for n, m in self.trainer.engine.module.named_modules() if isinstance(m, MoE)]
        return names[row] if row < len(names) else f"MoE layer {row}"
