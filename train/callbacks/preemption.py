"""Preemption: a signal (SLURM's `--signal`, a scheduler's SIGTERM) becomes a clean stop with a checkpoint."""

from __future__ import annotations

import signal
import sys
import time

from train.callbacks.base import Callback, StepResult
from train.engine.distributed import all_reduce_max_flag


class PreemptionHandler:
    """Records SIGTERM/SIGUSR1/SIGINT (configurable); the loop then finishes its step, saves and exits.

    Ranks may receive the signal at different moments, so `agreed()` all-reduces the flag: every rank stops after
    the same step, and the checkpoint is written by all of them together.
    """

    def __init__(self, names: list[str]) -> None:
        self.received_at: float | None = None
        self.signal_name: str | None = None
        self.install(names)

    def install(self, names: list[str]) -> None:
        """(Re)install the handlers, e.g. after libraries initialised during startup."""
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

    def agreed(self, device) -> bool:
        """True on every rank as soon as any rank has received a signal (one tiny all-reduce per step)."""
        return all_reduce_max_flag(self.received_at is not None, device)

    def seconds_since_signal(self) -> float | None:
        return None if self.received_at is None else time.monotonic() - self.received_at


class Preemption(Callback):
    """After each step, agree across ranks whether a preemption signal arrived; if so the trainer saves and stops."""

    def __init__(self, signals: list[str], grace_s: float, handler: PreemptionHandler | None = None) -> None:
        self.handler = handler or PreemptionHandler(signals)
        if handler is not None:  # installed early by the entry point, so no signal during startup is lost
            handler.install(signals)
        self.grace_s = grace_s
        self.preempted = False

    def post_step(self, result: StepResult, metrics: dict) -> None:
        pass

    def step_end(self, step: int) -> None:
        if self.handler.agreed(self.trainer.d.device):
            self.preempted = True
            self.trainer.request_stop("preempted")

    def post_train(self) -> None:
        waited = self.handler.seconds_since_signal()
        if self.preempted and self.trainer.d.is_main and waited is not None and waited > self.grace_s:
            print(f"[preemption] saving took {waited:.0f} s after the signal, more than "
                  f"checkpoint.preemption_grace_s={self.grace_s:.0f}", file=sys.stderr)  # fmt: skip
