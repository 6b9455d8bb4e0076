"""Numerical faults: non-finite and spiking losses skip their update; a run of spikes rolls back to the last
checkpoint and steps over the batches that spiked."""

from __future__ import annotations

import math
import sys

import torch

from train.callbacks.base import Callback, StepResult


class NumericGuard:
    """Decides, from the step's loss (all-reduced, so every rank decides alike), whether its update is skipped.

    Non-finite losses are skipped; so are spikes: a robust z-score (loss - median) / (1.4826 * MAD) over the last
    `window` accepted losses above `z_threshold`. `rollback_due` turns true after `max_consecutive` spikes in a row.
    Each spiking batch's data position is remembered so that a rollback can step over it.
    """

    def __init__(self, window: int, z_threshold: float, max_consecutive: int) -> None:
        self.window, self.z_threshold, self.max_consecutive = window, z_threshold, max_consecutive
        self.recent: list[float] = []
        self.consecutive = 0
        self.skipped_nonfinite = 0
        self.skipped_spike = 0
        self.rollbacks = 0
        self.bad_positions: list[int] = []

    def zscore(self, loss: float) -> float | None:
        """Robust z-score of `loss` against the window; None until the window is full."""
        if not self.window or len(self.recent) < self.window:
            return None
        values = torch.tensor(self.recent, dtype=torch.float64)
        median = values.median().item()  # lower median: exact and identical on every rank
        mad = (values - median).abs().median().item()
        scale = max(1.4826 * mad, 1e-6 * abs(median), 1e-12)  # a flat window must not divide by zero
        return (loss - median) / scale

    def verdict(self, loss: float) -> str | None:
        """'nonfinite', 'spike' or None (the update may go ahead); changes nothing."""
        if not math.isfinite(loss):
            return "nonfinite"
        z = self.zscore(loss)
        return "spike" if z is not None and z > self.z_threshold else None

    def record(self, verdict: str | None, loss: float, position: int) -> None:
        """After the step: count a skip (and remember a spike's data position) or add the loss to the window."""
        if verdict == "nonfinite":
            self.skipped_nonfinite += 1
        elif verdict == "spike":
            self.skipped_spike += 1
            self.consecutive += 1
            self.bad_positions.append(position)
        else:
            self.consecutive = 0
            if self.window:
                self.recent = (self.recent + [loss])[-self.window :]

    @property
    def rollback_due(self) -> bool:
        return self.consecutive >= self.max_consecutive

    def metrics(self) -> dict:
        return {"skipped_nonfinite": self.skipped_nonfinite, "skipped_spike": self.skipped_spike,
                "rollbacks": self.rollbacks}  # fmt: skip

    def state_dict(self) -> dict:
        """Saved: the window of accepted losses, the current spike streak, the skip counters and bad positions."""
        return {"recent": list(self.recent), "consecutive": self.consecutive, **self.metrics(),
                "bad_positions": list(self.bad_positions)}  # fmt: skip

    def load_state_dict(self, state: dict) -> None:
        self.recent = [float(v) for v in state["recent"]][-self.window :] if self.window else []
        self.consecutive = int(state["consecutive"])
        self.skipped_nonfinite = int(state["skipped_nonfinite"])
        self.skipped_spike = int(state["skipped_spike"])
        self.rollbacks = int(state["rollbacks"])
        self.bad_positions = [int(p) for p in state["bad_positions"]]


class StabilityGuard(Callback):
    """Vetoes updates the NumericGuard rejects, counts skips, and rolls the run back after `max_consecutive`
    spikes in a row (periodic saves wait while spikes are being skipped: the weights may be what is wrong)."""

    name = "faults"

    def __init__(self, window: int, z_threshold: float, max_consecutive: int) -> None:
        self.guard = NumericGuard(window, z_threshold, max_consecutive)

    def pre_step(self, step: int) -> None:
        self.trainer.loader.skip(self.guard.bad_positions)  # batches that spiked before a rollback

    def veto_update(self, loss: float) -> str | None:
        return self.guard.verdict(loss)

    def post_step(self, result: StepResult, metrics: dict) -> None:
        self.guard.record(result.skipped, result.loss, result.position)
        metrics.update(self.guard.metrics())
        if result.skipped is not None:
            metrics["skipped"] = result.skipped
            if self.trainer.d.is_main:
                print(
                    f"[faults] step {result.step}: {result.skipped} loss {result.loss:.4g} (grad norm "
                    f"{metrics.get('grad_norm', math.nan):.4g}), update skipped",
                    file=sys.stderr,
                    flush=True,
                )

    def step_end(self, step: int) -> None:
        if self.trainer.last_skipped == "spike" and self.guard.rollback_due:
            self.rollback(step)

    def allow_periodic_save(self) -> bool:
        return self.guard.consecutive == 0

    def rollback(self, at: int) -> None:
        """Back to the latest checkpoint, keeping the spiking batches' positions so the loader steps over them;
        skip counters and wall time carry on."""
        streak = self.guard.consecutive
        kept = self.guard.state_dict()
        tag = self.trainer.restore_latest()
        if tag is None:
            if self.trainer.d.is_main:
                print(f"[faults] {streak} spikes in a row but no checkpoint to roll back to: going on",
                      file=sys.stderr, flush=True)  # fmt: skip
            self.guard.consecutive = 0
            return
        # The checkpoint's window of accepted losses, this launch's counters and bad positions.
        self.guard.load_state_dict({**kept, "recent": self.guard.recent, "consecutive": 0,
                                    "rollbacks": kept["rollbacks"] + 1})  # fmt: skip
        if self.trainer.d.is_main:
            print(f"[faults] step {at}: {streak} spikes in a row, rolled back to {tag}; skipping the batches at "
                  f"positions {kept['bad_positions']}", file=sys.stderr, flush=True)  # fmt: skip
        self.trainer.log({"rollback_from": at, **self.guard.metrics(), "elapsed_s": self.trainer.elapsed()})

    def state_dict(self) -> dict:
        return self.guard.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.guard.load_state_dict(state)
