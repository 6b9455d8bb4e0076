"""Throughput and memory of every step: tokens/s, MFU, step time, peak memory."""

from __future__ import annotations

import sys
import time

from model import accelerator
from train.callbacks.base import Callback, StepResult


class SpeedMonitor(Callback):
    """`tokens_per_s` (this step's global batch over its wall time), `mfu` (model FLOPs over the peak of every
    rank), `step_time_s`, `peak_mem_gb` and `base_mem_gb` (memory in use before the model was built).

    An MFU above 1 cannot be true (the peak was understated, e.g. measured while other work slowed the machine):
    it is logged as null, with one warning saying why, rather than as a figure nobody should believe."""

    def __init__(self, tokens_per_step: int, flops_per_token: float, peak_flops: float, world_size: int,
                 base_mem_gb: float) -> None:  # fmt: skip
        self.tokens_per_step, self.flops_per_token = tokens_per_step, flops_per_token
        self.peak_total = peak_flops * world_size
        self.base_mem_gb = base_mem_gb
        self.rates: list[float] = []
        self._start = 0.0
        self._warned = False

    def pre_step(self, step: int) -> None:
        self._start = time.perf_counter()

    def post_step(self, result: StepResult, metrics: dict) -> None:
        elapsed = time.perf_counter() - self._start
        rate = self.tokens_per_step / elapsed
        self.rates.append(rate)
        mfu = self.flops_per_token * rate / self.peak_total
        if mfu > 1.0:
            if not self._warned and self.trainer.d.is_main:
                print(
                    f"[speed] warning: MFU {mfu:.2f} exceeds 1 (peak {self.peak_total / 1e12:.3g} TFLOP/s over all "
                    "ranks is understated: measured while other work slowed the machine?); logging mfu as null "
                    "where it exceeds 1: set train.peak_tflops=PER_RANK_PEAK for a fixed peak",
                    file=sys.stderr,
                )
            self._warned = True
            mfu = None
        metrics.update(
            tokens_per_s=rate,
            mfu=mfu,
            step_time_s=elapsed,
            peak_mem_gb=accelerator.peak_memory_gb(self.trainer.d.device),
            base_mem_gb=self.base_mem_gb,
        )

    @property
    def mean_rate(self) -> float | None:
        """Mean tokens/s of this launch without its first step (which pays for warm-up)."""
        steady = self.rates[1:] or self.rates
        return sum(steady) / len(steady) if steady else None
