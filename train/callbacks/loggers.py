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


def trim_metrics(path: Path, step: int) -> int:
    """Drop the rows of `path` logged after `step` (the checkpoint a run resumes from: those steps are trained
    again), rewriting the file atomically; returns how many rows were dropped. A torn last line (a kill mid-write)
    is dropped too."""
    if not path.is_file():
        return 0
    kept, dropped = [], 0
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            dropped += 1
            continue
        if int(row.get("step", 0)) <= step:
            kept.append(line)
        else:
            dropped += 1
    if dropped:
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "w") as f:
            f.write("".join(f"{line}\n" for line in kept))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    return dropped


class MetricsJsonl(Callback):
    """Appends one JSON object per logged step to RUN_DIR/metrics.jsonl, across resumes; each step appears once:
    rows past the checkpoint a launch resumes from (`resume_step`, 0 = none) are dropped first."""

    def __init__(self, run_dir: Path, resume_step: int = 0) -> None:
        self.dropped = trim_metrics(run_dir / "metrics.jsonl", resume_step)
        if self.dropped:
            print(f"[metrics] resuming from step {resume_step}: dropped {self.dropped} rows logged after it from "
                  f"{run_dir / 'metrics.jsonl'} (those steps are trained again)", file=sys.stderr)  # fmt: skip
        self.fh = open(run_dir / "metrics.jsonl", "a", buffering=1)

    def on_log(self, step: int, metrics: dict) -> None:
        self.fh.write(json.dumps({"step": step, **metrics}) + "\n")

    def close(self) -> None:
        self.fh.close()


class Wandb(Callback):
    """Same metrics and the resolved config to W&B; resumes the same W&B run id after a restart that continues where
    it stopped (preemption, exit_after_steps).

    A resume that goes back (`rewound`: steps after the checkpoint had been logged, a kill or crash) starts a new W&B
    run instead, `<id>-s<step>`, in the same group (the run's first id when logging.wandb.group is unset), so that
    no W&B run holds a step twice. W&B's own rewind (`resume_from`) is done by the server, is not available in
    offline mode, and was in preview, so it is not used.
    """

    def __init__(self, cfg: LoggingConfig, run_dir: Path, config: dict, name: str | None, rewound_to: int | None = None
                 ) -> None:  # fmt: skip
        try:
            import wandb  # lazy: a benchmark or a disabled run must not need it
        except ImportError as e:
            raise ImportError(
                f"logging.wandb.mode={cfg.wandb.mode} needs the wandb package: `pip install wandb`, "
                "or set logging.wandb.mode=disabled"
            ) from e

        id_file = run_dir / "wandb_run_id.txt"
        run_id = id_file.read_text().strip() if id_file.is_file() else uuid.uuid4().hex[:12]
        first_id = run_id.split("-s")[0]
        display = cfg.wandb.name or name
        if rewound_to is not None:
            run_id = f"{first_id}-s{rewound_to}-{uuid.uuid4().hex[:4]}"
            display = f"{display or first_id} (from step {rewound_to})"
        id_file.write_text(run_id)
        os.environ.setdefault("WANDB_SILENT", "true")
        self.run = wandb.init(
            project=cfg.wandb.project,
            entity=cfg.wandb.entity,
            group=redact(cfg.wandb.group or first_id),
            name=redact(display),
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
