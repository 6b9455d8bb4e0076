"""`python -m launch.run --nproc_per_node=N -m train.pretrain experiment=NAME run.dir=DIR [overrides]` (or plain
`torchrun`): pretrain a model."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

from data_pipeline.cli import run_hydra_main, to_object_strict, user_errors
from model import accelerator
from train.callbacks.preemption import PreemptionHandler
from train.config import PretrainConfig, move_deprecated_keys
from train.engine.distributed import init_distributed, shutdown
from train.engine.launcher import follow_launcher
from train.tools.sweep import in_sweep, run_sweep_job
from train.trainer import build


def run(cfg: PretrainConfig, raw: DictConfig) -> dict:
    """Plan (every check before any collective), hold run.dir (rank 0), join the job, build, resume if a checkpoint
    exists, train."""
    # First: a Ctrl-C / SIGTERM while the job starts is kept, and the run stops after its first step with a save.
    stop = PreemptionHandler(list(cfg.checkpoint.preemption_signals))
    lock = build.lock_run_dir(cfg)  # rank 0; a second launch stops here, before any other work
    try:
        plan = build.plan_run(cfg, int(os.environ.get("WORLD_SIZE", "1")))
        return train(plan, cfg, raw, stop)
    finally:
        if lock is not None:
            lock.release()


def train(plan: build.Plan, cfg: PretrainConfig, raw: DictConfig, stop: PreemptionHandler) -> dict:
    d = init_distributed(cfg.deepspeed)
    build.set_threads(cfg, d.local_world_size)
    base_mem = accelerator.memory_in_use_gb(d.device)
    trainer, loggers = build.build_trainer(plan, raw, d, base_mem, stop)
    try:
        if plan.resume_tag:
            trainer.resume(plan.resume_tag)
            if d.is_main:
                print(f"[pretrain] resumed from {Path(cfg.run.dir) / 'checkpoints' / plan.resume_tag}", file=sys.stderr)
        summary = trainer.fit()
    finally:
        for cb in loggers:
            cb.close()
    summary.update(first_val_loss=trainer.validator.first, val_loss=trainer.validator.last,
                   tokens_per_s=trainer.monitor.mean_rate)  # fmt: skip
    if d.is_main:
        summary = {"run_dir": str(cfg.run.dir), **summary}
        print(json.dumps(summary))
    return summary


@hydra.main(config_path="../configs", config_name="train", version_base="1.3")
def main(raw: DictConfig) -> None:
    if in_sweep():
        run_sweep_job(raw)  # each multirun job is its own torchrun job
        return
    try:
        with user_errors():
            move_deprecated_keys(raw)
            cfg: PretrainConfig = to_object_strict(raw)
            run(cfg, raw)
    finally:
        shutdown()


if __name__ == "__main__":
    follow_launcher()  # under torchrun: end with the launcher, even when it is killed with -9
    run_hydra_main(main)
