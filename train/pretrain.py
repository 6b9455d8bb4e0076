"""`torchrun --nproc_per_node=N -m train.pretrain experiment=NAME run.dir=DIR [overrides]`: pretrain a model."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from data_pipeline.cli import to_object_strict, user_errors
from train.config import PretrainConfig


def run(cfg: PretrainConfig, raw: DictConfig) -> dict:
    from data_pipeline.bom import bom_summary
    from model.flops import flops_per_token
    from train import build
    from train.callbacks import MetricsJsonl, Progress, Wandb
    from train.checkpoint import model_meta
    from train.engine import build_engine, init_distributed
    from train.faults import PreemptionHandler
    from train.loop import Trainer, current_memory_gb
    from train.mfu import peak_flops
    from train.optimize import optimize_model
    from train.secrets import redact

    world = int(os.environ.get("WORLD_SIZE", "1"))
    plan = build.plan_run(cfg, world)
    d = init_distributed(cfg.deepspeed)
    build.set_threads(cfg, d.local_world_size)
    base_mem = current_memory_gb(d.device)
    model = build.build_model(plan.model, cfg.train.seed, cfg.deepspeed.zero_stage)
    optimize_model(model, cfg.train.compile, cfg.train.fp8)
    engine, _, scheduler = build_engine(model, cfg.train, cfg.optim, cfg.deepspeed, plan.layout, d, plan.load_universal)
    loader, val, val_sources = build.build_data(plan, d.rank, d.world_size)
    run_dir = Path(cfg.run.dir)
    resolved = redact(OmegaConf.to_container(raw, resolve=True))  # what is saved or sent to W&B holds no secret
    resolved["model"]["vocab_size"] = plan.model.vocab_size
    resolved["model"]["eos_id"] = plan.model.eos_id
    callbacks = []
    if d.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.create(resolved)))
        (run_dir / "bom.json").write_text(json.dumps(plan.manifest, indent=2, ensure_ascii=False))
        callbacks.append(MetricsJsonl(run_dir))
        if cfg.logging.wandb.mode != "disabled":
            wandb_config = {**resolved, "data_bom": bom_summary(plan.manifest)}
            callbacks.append(Wandb(cfg.logging, run_dir, wandb_config, cfg.run.name))
        if cfg.logging.progress:
            callbacks.append(Progress(cfg.train.max_steps, 0))
    meta = model_meta(
        plan.model,
        plan.tokenizer_sha256,
        zero_stage=cfg.deepspeed.zero_stage,
        world_size=d.world_size,
        seq_len=cfg.train.seq_len,
        data_path=str(cfg.data.path),
        tokenizer_path=str(cfg.tokenizer.path),
    )
    peak = cfg.train.peak_tflops * 1e12 if cfg.train.peak_tflops else peak_flops(d.device)
    trainer = Trainer(
        cfg,
        d,
        engine,
        scheduler,
        loader,
        val,
        val_sources,
        callbacks,
        meta,
        flops_per_token(plan.model, cfg.train.seq_len),
        peak,
    )
    trainer.base_mem_gb = base_mem
    trainer.preemption = PreemptionHandler(list(cfg.checkpoint.preemption_signals))
    try:
        if plan.resume_tag:
            trainer.resume(plan.resume_tag)
            if d.is_main:
                print(f"[pretrain] resumed from {run_dir / 'checkpoints' / plan.resume_tag}", file=sys.stderr)
            for cb in callbacks:
                cb.on_resume(trainer.step)
        summary = trainer.fit()
    finally:
        for cb in callbacks:
            cb.close()
    if d.is_main:
        summary = {"run_dir": str(run_dir), **summary}
        print(json.dumps(summary))
    return summary


@hydra.main(config_path="../configs", config_name="train", version_base="1.3")
def main(raw: DictConfig) -> None:
    from train.sweep import in_sweep, run_sweep_job

    if in_sweep():
        run_sweep_job(raw)  # each multirun job is its own torchrun job
        return
    try:
        with user_errors():
            cfg: PretrainConfig = to_object_strict(raw)
            run(cfg, raw)
    finally:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
