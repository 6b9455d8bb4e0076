"""The training loop: draw a batch, run the step, let the components do what is due, save when due.

Everything else is a registered component (train.callbacks): validation, balancing, monitoring, logging, the
stability guard, preemption, heartbeat and (debug) fault injection. Parallelism lives in the engine it is handed.
"""

from __future__ import annotations

import math
import time

from data_pipeline.loader import DistributedBatchLoader
from train.callbacks.base import Callback, Callbacks, StepResult
from train.checkpoint.manager import Checkpointer
from train.config import TrainConfig
from train.engine.deepspeed_engine import Engine
from train.engine.distributed import Dist
from train.trainer.objective import Objective


class Trainer:
    def __init__(self, cfg: TrainConfig, log_every: int, d: Dist, engine: Engine, loader: DistributedBatchLoader,
                 objective: Objective, checkpointer: Checkpointer, callbacks: list[Callback]) -> None:  # fmt: skip
        self.cfg, self.log_every, self.d, self.engine = cfg, log_every, d, engine
        self.loader, self.objective, self.checkpointer = loader, objective, checkpointer
        self.callbacks = Callbacks(callbacks)
        self.callbacks.attach(self)
        self.step = 0
        self.position = 0
        """Data position (sequences consumed) of the batch being trained on."""
        self.loss = math.nan
        self.last_skipped: str | None = None
        self.stop_reason: str | None = None
        self._elapsed_before = 0.0  # wall seconds of training before this launch (restored on resume)
        self._launch_start: float | None = None

    def fit(self) -> dict:
        """Train to `train.max_steps` (or `train.exit_after_steps` more); returns a summary."""
        t = self.cfg
        stop_at = t.max_steps if t.exit_after_steps is None else min(t.max_steps, self.step + t.exit_after_steps)
        self.callbacks.pre_train()  # the first validation is not training time
        self._launch_start = time.perf_counter()
        while self.step < stop_at:
            self.callbacks.pre_step(self.step + 1)
            result = self.train_step()
            metrics = {"loss": result.loss, "lr": result.lr, "grad_norm": self.engine.grad_norm,
                       "tokens": self.loader.consumed * t.seq_len, **result.parts}  # fmt: skip
            self.callbacks.post_step(result, metrics)
            metrics["elapsed_s"] = self.elapsed()
            evaluated = "val_loss" in metrics or any(k.startswith("downstream/") for k in metrics)
            if self.step % self.log_every == 0 or evaluated or self.step == t.max_steps or result.skipped:
                self.log(metrics)
            rollbacks = self._rollbacks
            self.callbacks.step_end(self.step)
            if self._rollbacks != rollbacks:
                continue  # restored an earlier checkpoint: nothing of this step is kept
            if self.checkpointer.due(self.step, stop_at, self.stop_reason is not None,
                                     self.callbacks.allow_periodic_save()):  # fmt: skip
                self.save()
            if self.stop_reason is not None:
                break
        self.callbacks.post_train()
        return {"steps": self.step, "loss": self.loss, "preempted": self.stop_reason == "preempted"}

    def train_step(self) -> StepResult:
        """Forward and backward over this rank's micro-batches, then one optimizer step (vetoed by a component,
        or skipped by the engine for non-finite gradients). The schedule advances either way."""
        self.position = self.loader.consumed
        micro = self.loader.next_step()
        lr = self.engine.lr
        self.objective.begin(self.step / self.cfg.max_steps)
        decided: list = []

        def decide() -> bool:  # after the last backward, before the update; every rank sees the same values
            loss, parts, loads = self.objective.finish()
            decided[:] = [loss, parts, loads, self.callbacks.veto_update(loss)]
            return decided[3] is not None

        applied = self.engine.train_batch(micro, self.objective.loss, decide)
        loss, parts, loads, verdict = decided
        if verdict is None and not applied:  # DeepSpeed's overflow check or the engine's: non-finite gradients
            verdict = "nonfinite"
        self.step += 1
        self.engine.advance_schedule(self.step)
        self.loss, self.last_skipped = loss, verdict
        return StepResult(self.step, self.position, loss, lr, applied, verdict, loads, parts)

    # --- state ---------------------------------------------------------------------------------------------------

    _rollbacks = 0

    def elapsed(self) -> float:
        """Wall seconds of training, over every launch of this run."""
        return self._elapsed_before + (time.perf_counter() - self._launch_start if self._launch_start else 0.0)

    def request_stop(self, reason: str) -> None:
        """Save after this step and stop (every rank must ask at the same step)."""
        self.stop_reason = reason

    def log(self, metrics: dict) -> None:
        self.callbacks.on_log(self.step, metrics)

    def state_dict(self) -> dict:
        """The run's own state plus every stateful component's, under its name."""
        state = {"step": self.step, "loader": self.loader.state_dict(), "elapsed_s": self.elapsed()}
        for cb in self.callbacks.stateful():
            state[cb.name] = cb.state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        self.loader.load_state_dict(state["loader"])
        self.step = int(state["step"])
        self._elapsed_before = float(state.get("elapsed_s", 0.0))
        for cb in self.callbacks.stateful():
            if cb.name in state:
                cb.load_state_dict(state[cb.name])

    def save(self) -> None:
        self.checkpointer.save(self.engine, self.step, self.state_dict())

    def resume(self, tag: str) -> None:
        self.load_state_dict(self.checkpointer.load(self.engine, tag))
        self.callbacks.on_resume(self.step)

    def restore_latest(self) -> str | None:
        """Roll back to the latest checkpoint (wall time carries on); None when there is none."""
        tag = self.checkpointer.latest()
        if tag is None:
            return None
        elapsed = self.elapsed()
        self.load_state_dict(self.checkpointer.load(self.engine, tag))
        self._elapsed_before, self._launch_start = elapsed, time.perf_counter()
        self._rollbacks += 1
        return tag
