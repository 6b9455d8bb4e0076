"""Auxiliary-loss-free load balancing (DeepSeek-V3): after each applied update, every MoE layer's selection bias
moves toward balance by gamma * sign(mean load - load), from routed-token counts all-reduced over the ranks (so the
biases stay identical without a broadcast). As torchtitan's optimizer hook, but only for updates that ran."""

from __future__ import annotations

from model.moe import max_violation
from train.callbacks.base import Callback, StepResult
from train.config import BalanceConfig


class MoEBalance(Callback):
    def __init__(self, balance: BalanceConfig, max_steps: int) -> None:
        self.balance, self.max_steps = balance, max_steps

    def post_step(self, result: StepResult, metrics: dict) -> None:
        if result.expert_loads is None:
            return
        if result.applied:
            gamma = self.balance.gamma_at((result.step - 1) / self.max_steps)
            if gamma:
                for moe, load in zip(self.trainer.engine.module.moe_layers(), result.expert_loads, strict=True):
                    moe.gate.update_bias(load, gamma)
        metrics["moe_max_violation"] = max_violation(result.expert_loads)
