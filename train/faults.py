"""Preemption: a signal (SLURM's `--signal`, a scheduler's SIGTERM) becomes a clean stop with a checkpoint."""

from __future__ import annotations

import signal
import sys
import time

import torch
import torch.distributed as dist


class PreemptionHandler:
    """Records SIGTERM/SIGUSR1 (configurable); the loop then finishes its step, saves and exits.

    Ranks may receive the signal at different moments, so `agreed()` all-reduces the flag: every rank stops after
    the same step, and the checkpoint is written by all of them together.
    """

    def __init__(self, names: list[str]) -> None:
        self.received_at: float | None = None
        self.signal_name: str | None = None
        for name in names:
            sig = getattr(signal, name, None)
            if sig is None:
                raise ValueError(f"checkpoint.preemption_signals: unknown signal {name!r} (e.g. SIGTERM, SIGUSR1)")
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        if self.received_at is None:
            self.received_at = time.monotonic()
            self.signal_name = signal.Signals(signum).name
            print(f"[preemption] {self.signal_name}: saving after this step, then exiting", file=sys.stderr, flush=True)

    def agreed(self, device: torch.device) -> bool:
        """True on every rank as soon as any rank has received a signal (one tiny all-reduce per step)."""
        flag = torch.tensor([1.0 if self.received_at is not None else 0.0], device=device)
        if dist.is_initialized():
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def seconds_since_signal(self) -> float | None:
        return None if self.received_at is None else time.monotonic() - self.received_at
