"""The components a training run is made of, and the points of the step at which the trainer calls them.

As OLMo-core's callbacks: each component decides by itself when it is due, and one with state (`name` set) has
`state_dict` / `load_state_dict`, saved with every checkpoint under its name (the trainer assembles the checkpoint
state from the registered components; nothing is listed by hand).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from train.trainer.trainer import Trainer


@dataclass
class StepResult:
    """One optimizer step as the trainer saw it (every value agreed across ranks)."""

    step: int
    position: int
    """Global data position (sequences consumed) of the step's batch."""
    loss: float
    """Mean next-token cross-entropy over the step's micro-batches and ranks."""
    lr: float
    applied: bool
    """The update ran (not vetoed, gradients finite)."""
    skipped: str | None = None
    """Why the update was skipped: 'nonfinite' | 'spike' | None."""
    expert_loads: object = None
    """(n_moe_layers, E) routed-token counts summed over micro-batches and ranks (MoE models)."""
    parts: dict = field(default_factory=dict)
    """Other loss terms averaged over micro-batches and ranks: mtp_loss, aux_loss."""


class Callback:
    """A component of the run; every hook is a no-op by default. `trainer` is set when it is registered."""

    name: str = ""
    """Key of this component's state in a checkpoint; "" = it keeps no state."""
    trainer: Trainer

    def pre_train(self) -> None:
        """Before the first step of this launch (after any resume)."""

    def on_resume(self, step: int) -> None:
        """The run continues from checkpoint `step`."""

    def pre_step(self, step: int) -> None:
        """Before the batch of `step` is drawn."""

    def veto_update(self, loss: float) -> str | None:
        """Before the optimizer step: a reason to skip this update, or None."""
        return None

    def post_step(self, result: StepResult, metrics: dict) -> None:
        """After the update; may add to `metrics`."""

    def on_log(self, step: int, metrics: dict) -> None:
        """Metrics of a step that is logged (rank 0 only registers loggers)."""

    def step_end(self, step: int) -> None:
        """After the step was logged, before a checkpoint is considered."""

    def allow_periodic_save(self) -> bool:
        return True

    def post_train(self) -> None:
        """After the last step of this launch (also after a graceful stop)."""

    def close(self) -> None:
        """Always, at the end of the launch."""

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class Callbacks:
    """The registered components, called in registration order."""

    def __init__(self, callbacks: list[Callback]) -> None:
        self.items = list(callbacks)

    def __iter__(self):
        return iter(self.items)

    def attach(self, trainer: Trainer) -> None:
        for cb in self.items:
            cb.trainer = trainer

    def stateful(self) -> list[Callback]:
        return [cb for cb in self.items if cb.name]

    def pre_train(self) -> None:
        for cb in self.items:
            cb.pre_train()

    def on_resume(self, step: int) -> None:
        for cb in self.items:
            cb.on_resume(step)

    def pre_step(self, step: int) -> None:
        for cb in self.items:
            cb.pre_step(step)

    def veto_update(self, loss: float) -> str | None:
        for cb in self.items:
            if (reason := cb.veto_update(loss)) is not None:
                return reason
        return None

    def post_step(self, result: StepResult, metrics: dict) -> None:
        for cb in self.items:
            cb.post_step(result, metrics)

    def on_log(self, step: int, metrics: dict) -> None:
        for cb in self.items:
            cb.on_log(step, metrics)

    def step_end(self, step: int) -> None:
        for cb in self.items:
            cb.step_end(step)

    def allow_periodic_save(self) -> bool:
        return all(cb.allow_periodic_save() for cb in self.items)

    def post_train(self) -> None:
        for cb in self.items:
            cb.post_train()

    def close(self) -> None:
        for cb in self.items:
            cb.close()
