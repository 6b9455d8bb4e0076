"""When to save, and saving or restoring a whole run's state: the engine's (DeepSpeed) and the registered
components' (the trainer assembles them; see train.callbacks.base)."""

from __future__ import annotations

from pathlib import Path

from train.checkpoint import collective
from train.checkpoint.layout import FileOp, latest_tag
from train.config import CheckpointConfig


class Checkpointer:
    def __init__(self, ckpt_dir: Path, cfg: CheckpointConfig, meta: dict, file_op: FileOp | None = None) -> None:
        self.dir, self.cfg, self.meta, self.file_op = Path(ckpt_dir), cfg, meta, file_op

    def due(self, step: int, stop_at: int, stopping: bool, periodic_allowed: bool) -> bool:
        """Every `checkpoint.every_steps` (unless a component holds periodic saves), at the last step of this
        launch, and when the run is stopping (preemption)."""
        every = self.cfg.every_steps
        periodic = bool(every) and step % every == 0 and periodic_allowed
        return periodic or step == stop_at or stopping

    def latest(self) -> str | None:
        return latest_tag(self.dir, self.cfg.verify_hashes)

    def save(self, engine, step: int, state: dict) -> None:
        """Collective: every rank calls it."""
        collective.save(engine.ds, self.dir, step, state, self.meta, engine.full_state_dict(), self.cfg.keep_last,
                        self.cfg.keep_every, self.file_op)  # fmt: skip

    def load(self, engine, tag: str) -> dict:
        """Collective: restore the engine from checkpoint `tag`; returns the components' state."""
        state = collective.load(engine.ds, self.dir, tag)
        engine.after_load(self.dir / tag)
        return state
