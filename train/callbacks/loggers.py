"""Where metrics go, on rank 0: metrics.jsonl, Weights & Biases, the progress bar."""

from __future__ import annotations

import json
import os
import sys
import uuid
from pathlib import Path

from train.callbacks.base import Callback
from train.config import LoggingConfig
from train.secrets import redact


class MetricsJsonl(Callback):
    """Appends one JSON object per logged step to RUN_DIR/metrics.jsonl (appends across resumes)."""

    def __init__(self, run_dir: Path) -> None:
        self.fh = open(run_dir / "metrics.jsonl", "a", buffering=1)

    def on_log(self, step: int, metrics: dict) -> None:
        self.fh.write(json.dumps({"step": step, **metrics}) + "\n")

    def close(self) -> None:
        self.fh.close()


class Wandb(Callback):
    """Same metrics and the resolved config to W&B; resumes the same W&B run id after a restart."""

    def __init__(self, cfg: LoggingConfig, run_dir: Path, config: dict, name: str | None) -> None:
        try:
            import wandb  # lazy: a benchmark or a disabled run must not need it
        except ImportError as e:
            raise ImportError(
                f"logging.wandb.mode={cfg.wandb.mode} needs the wandb package: `pip install wandb`, "
                "or set logging.wandb.mode=disabled"
            ) from e

        id_file = run_dir / "wandb_run_id.txt"
        run_id = id_file.read_text().strip() if id_file.is_file() else uuid.uuid4().hex[:12]
        id_file.write_text(run_id)
        os.environ.setdefault("WANDB_SILENT", "true")
        self.run = wandb.init(
            project=cfg.wandb.project,
            entity=cfg.wandb.entity,
            group=redact(cfg.wandb.group),
            name=redact(cfg.wandb.name or name),
            tags=redact(list(cfg.wandb.tags)),
            mode=cfg.wandb.mode,
            dir=str(run_dir),
            config=redact(config),
            id=run_id,
            resume="allow",
        )

    def on_log(self, step: int, metrics: dict) -> None:
        self.run.log(metrics, step=step)

    def close(self) -> None:
        self.run.finish()


class Progress(Callback):
    """A tqdm bar with the latest loss; refreshes rarely when stderr is not a terminal (CI logs)."""

    def __init__(self, total: int, initial: int) -> None:
        from tqdm import tqdm

        tty = sys.stderr.isatty()
        self.bar = tqdm(total=total, initial=initial, desc="train", mininterval=0.5 if tty else 15, dynamic_ncols=True)
        self.last = initial

    def on_resume(self, step: int) -> None:
        self.bar.update(step - self.last)
        self.last = step

    def on_log(self, step: int, metrics: dict) -> None:
        self.bar.update(step - self.last)
        self.last = step
        shown = {k: f"{metrics[k]:.4g}" for k in ("loss", "val_loss", "tokens_per_s") if k in metrics}
        self.bar.set_postfix(shown, refresh=False)

    def close(self) -> None:
        self.bar.close()
