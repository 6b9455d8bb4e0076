"""Learning-rate schedules as multipliers of the peak LR (for torch.optim.lr_scheduler.LambdaLR)."""

from __future__ import annotations

import math
from collections.abc import Callable


def lr_multiplier(schedule: str, warmup: int, max_steps: int, min_ratio: float, decay_fraction: float) -> Callable:
    """Return f(step) -> multiplier; linear warmup over `warmup` steps, then cosine, WSD or constant."""

    def f(step: int) -> float:
        if warmup and step < warmup:
            return (step + 1) / warmup
        if schedule == "constant":
            return 1.0
        if schedule == "cosine":
            progress = min(1.0, (step - warmup) / max(1, max_steps - warmup))
            return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
        # wsd: stable at the peak, then linear decay over the last decay_fraction of the run
        decay_start = max(warmup, int(max_steps * (1 - decay_fraction)))
        if step < decay_start:
            return 1.0
        progress = min(1.0, (step - decay_start) / max(1, max_steps - decay_start))
        return 1.0 - (1.0 - min_ratio) * progress

    return f
