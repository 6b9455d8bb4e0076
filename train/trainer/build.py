"""Turn a validated PretrainConfig into the objects of a run: `plan_run` checks everything that can fail from
config and files alone, before any collective; `build_trainer` assembles the engine, the data and the components."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from data_pipeline.bom import bom_summary
from data_pipeline.loader import DistributedBatchLoader, PackedSequences
from data_pipeline.shards import read_manifest
from data_pipeline.text_tokenizer import load_tokenizer
from model import accelerator
from model.attention import load_flash_attn
from model.config import ExecutionConfig, ModelConfig
from model.flops import flops_per_token
from model.transformer import Transformer
from train.callbacks import faults
from train.callbacks.base import Callback
from train.callbacks.downstream import DownstreamEval
from train.callbacks.heartbeat import Heartbeat
from train.callbacks.loggers import MetricsJsonl, Progress, Wandb
from train.callbacks.moe import MoEBalance
from train.callbacks.monitor import SpeedMonitor
from train.callbacks.preemption import Preemption
from train.callbacks.stability import StabilityGuard
from train.checkpoint.compat import check_compatible, model_meta, needs_universal
from train.checkpoint.layout import latest_tag, read_meta
from train.checkpoint.manager import Checkpointer
from train.config import PretrainConfig
from train.engine import expert_parallel
from train.engine.deepspeed_engine import Engine, build_engine
from train.engine.distributed import Dist
from train.engine.optimize import check_fp8, optimize_model
from train.secrets import redact
from train.trainer.layout import BatchLayout, check_ep_size, make_layout
from train.trainer.objective import Objective
from train.trainer.trainer import Trainer
from train.trainer.validation import Validator


@dataclasses.dataclass
class Plan:
    """Everything decided from config and files alone, before processes talk to each other."""

    cfg: PretrainConfig
    model: ModelConfig
    layout: BatchLayout
    manifest: dict
    tokenizer_sha256: str
    resume_tag: str | None
    load_universal: bool = False
    """The checkpoint was saved with another world size or ZeRO stage: load it through DeepSpeed's universal format."""
    token_bytes: list[int] | None = None
    """UTF-8 bytes of each token id's text (the tokenizer's `token_bytes()`), for val_bpb; None: not reported."""


def plan_run(cfg: PretrainConfig, world_size: int) -> Plan:
    """Check the config against the tokenizer, the prepared data and any checkpoint in run.dir."""
    if not cfg.run.dir or cfg.run.dir == "???":
        raise ValueError("set run.dir=DIR: where this run writes config.yaml, metrics.jsonl and checkpoints/")
    if not cfg.tokenizer.path:
        raise ValueError("set tokenizer.path=DIR: a tokenizer trained by `python -m tokenizer.train`")
    if not cfg.data.path:
        raise ValueError("set data.path=DIR: token shards written by `python -m data_pipeline.prepare`")
    tok = load_tokenizer(cfg.tokenizer)
    manifest = read_manifest(cfg.data.path)
    if manifest["tokenizer"]["sha256"] != tok.sha256:
        raise ValueError(
            f"data.path={cfg.data.path} was tokenized with tokenizer sha256 {manifest['tokenizer']['sha256'][:12]}…, "
            f"but tokenizer.path={cfg.tokenizer.path} has {tok.sha256[:12]}…: re-run prepare with this tokenizer, or "
            "point tokenizer.path at the one the data was made with"
        )
    model = cfg.model
    if model.vocab_size == 0:
        model = dataclasses.replace(model, vocab_size=tok.vocab_size)
    elif model.vocab_size < tok.vocab_size:
        raise ValueError(f"model.vocab_size={model.vocab_size} is smaller than the tokenizer's {tok.vocab_size}")
    if model.doc_masking:
        # Shards separate documents with the tokenizer's eos (data_pipeline.prepare); the model needs the same id.
        if tok.eos_id < 0:
            raise ValueError(f"model.doc_masking=true but tokenizer.path={cfg.tokenizer.path} has no eos token")
        if model.eos_id == -1:
            model = dataclasses.replace(model, eos_id=tok.eos_id)
        elif model.eos_id != tok.eos_id:
            raise ValueError(
                f"model.eos_id={model.eos_id} is not the tokenizer's eos id {tok.eos_id}, which separates the "
                "documents of the shards: leave model.eos_id at -1 to take it from the tokenizer"
            )
    ex = cfg.execution
    if ex.attn_backend == "flex" and not accelerator.has_accelerator():
        raise ValueError(
            "execution.attn_backend=flex trains on CUDA only (torch has no FlexAttention backward on CPU): "
            "set execution.attn_backend=sdpa"
        )
    ep_size = cfg.parallel.ep_size if model.moe.enabled else 1
    if model.moe.enabled:
        check_ep_size(ep_size, world_size, model.moe.n_routed_experts, cfg.deepspeed.zero_stage)
    if cfg.train.seq_len > model.max_seq_len:
        raise ValueError(f"train.seq_len={cfg.train.seq_len} exceeds model.max_seq_len={model.max_seq_len}")
    if ex.attn_backend == "flash_attn":
        load_flash_attn()  # fails here, with its own message, rather than after the processes have started
    if ex.activation_checkpointing == "selective" and cfg.deepspeed.zero_stage == 3:
        # ZeRO-3 gathers parameters inside the checkpointed region, so the recompute replays other operators than
        # the forward did and selective checkpointing's operator cache fails in backward.
        raise ValueError(
            "execution.activation_checkpointing=selective does not work with deepspeed.zero_stage=3: use "
            "activation_checkpointing=full, or zero_stage 0-2"
        )
    if ex.fp8:
        check_fp8()
    layout = make_layout(cfg.train.global_batch_tokens, cfg.train.seq_len, cfg.train.micro_batch_size, world_size)
    ckpt_dir = Path(cfg.run.dir) / "checkpoints"
    tag = latest_tag(ckpt_dir, cfg.checkpoint.verify_hashes)
    universal = False
    if tag is not None:
        # A torchrun restart (--max-restarts) of this same job resumes its own checkpoints even under `never`.
        if cfg.checkpoint.resume == "never" and os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0":
            raise ValueError(
                f"{ckpt_dir} already holds checkpoint {tag} and checkpoint.resume=never: use a new run.dir"
            )
        meta = read_meta(ckpt_dir, tag)
        check_compatible(meta, model, tok.sha256, ckpt_dir / tag, ep_size)
        universal = needs_universal(meta, world_size, cfg.deepspeed.zero_stage, ckpt_dir / tag)
    token_bytes = tok.token_bytes() if hasattr(tok, "token_bytes") else None
    return Plan(cfg, model, layout, manifest, tok.sha256, tag, universal, token_bytes)


def set_threads(cfg: PretrainConfig, local_world_size: int) -> None:
    """On CPU, share the cores between the ranks of this node instead of oversubscribing them."""
    if not accelerator.has_accelerator():
        n = cfg.train.threads_per_rank or max(1, (os.cpu_count() or 1) // local_world_size)
        torch.set_num_threads(n)


def build_model(model: ModelConfig, execution: ExecutionConfig, ep_size: int, seed: int, zero_stage: int):
    """Same seed on every rank, so every rank starts from identical weights (and, with expert parallelism, from
    its slices of the same experts). With ep_size > 1 this creates the expert groups (collective)."""
    ep_size = ep_size if model.moe.enabled else 1
    dispatcher = expert_parallel.make_dispatcher(ep_size)
    torch.manual_seed(seed)
    module = Transformer(model, execution, dispatcher)
    if dispatcher is not None:
        expert_parallel.prepare_model(module, ep_size, zero_stage)
    return optimize_model(module, execution.compile, execution.fp8)


def build_data(plan: Plan, rank: int, world_size: int):
    """The training loader, the whole validation split, and each source's validation part (when big enough)."""
    t, path = plan.cfg.train, plan.cfg.data.path
    train = PackedSequences(path, "train", t.seq_len)
    loader = DistributedBatchLoader(train, t.micro_batch_size, plan.layout.grad_accum, rank, world_size, t.seed)
    val = PackedSequences(path, "val", t.seq_len)
    sources = {}
    for name in plan.manifest["sources"]:
        part = PackedSequences(path, "val", t.seq_len, source=name)
        if len(part) >= world_size:
            sources[name] = part
    return loader, (val if len(val) >= world_size else None), sources


def write_run_files(plan: Plan, raw: DictConfig) -> dict:
    """config.yaml (resolved, secrets redacted) and bom.json in run.dir (rank 0); returns the resolved config."""
    resolved = redact(OmegaConf.to_container(raw, resolve=True))  # what is saved or sent to W&B holds no secret
    resolved["model"]["vocab_size"] = plan.model.vocab_size
    resolved["model"]["eos_id"] = plan.model.eos_id
    run_dir = Path(plan.cfg.run.dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.create(resolved)))
    (run_dir / "bom.json").write_text(json.dumps(plan.manifest, indent=2, ensure_ascii=False))
    return resolved


def build_trainer(plan: Plan, raw: DictConfig, d: Dist, base_mem_gb: float) -> tuple[Trainer, list[Callback]]:
    """The engine, the data and every component of the run, registered with a Trainer; returns it and the
    loggers (rank 0) that must be closed at the end."""
    cfg = plan.cfg
    model = build_model(plan.model, cfg.execution, cfg.parallel.ep_size, cfg.train.seed, cfg.deepspeed.zero_stage)
    ds_engine, _, scheduler = build_engine(model, cfg.train, cfg.optim, cfg.deepspeed, plan.layout, d,
                                           plan.load_universal)  # fmt: skip
    engine = Engine(ds_engine, scheduler, cfg.deepspeed.zero_stage)
    loader, val, val_sources = build_data(plan, d.rank, d.world_size)
    meta = model_meta(plan.model, plan.tokenizer_sha256, cfg.execution, zero_stage=cfg.deepspeed.zero_stage,
                      world_size=d.world_size, ep_size=cfg.parallel.ep_size if plan.model.moe.enabled else 1,
                      seq_len=cfg.train.seq_len, data_path=str(cfg.data.path),
                      tokenizer_path=str(cfg.tokenizer.path))  # fmt: skip
    debug = faults.active(cfg.debug)
    kill_points = faults.KillDuringSave(cfg.debug.kill_during_save_at) if debug else None
    checkpointer = Checkpointer(Path(cfg.run.dir) / "checkpoints", cfg.checkpoint, meta, kill_points)
    peak = cfg.train.peak_tflops * 1e12 if cfg.train.peak_tflops else accelerator.peak_flops(d.device)
    # Order matters where components meet: the guard sees the loss before the update, the balancer and the
    # monitor close the step before validation, fault injection acts before the guard's rollback.
    components: list[Callback] = []
    if debug:  # first: a stalled rank stalls before it checks in, so the heartbeat names it
        components.append(faults.FaultInjection(cfg.debug, d.rank, d.world_size, loader.global_batch))
    if cfg.deepspeed.heartbeat:
        components.append(Heartbeat(cfg.deepspeed.timeout_minutes))
    spike = cfg.train.spike
    components.append(StabilityGuard(spike.window, spike.z_threshold, spike.max_consecutive))
    if plan.model.moe.enabled:
        components.append(MoEBalance(cfg.train.moe, cfg.train.max_steps))
    monitor = SpeedMonitor(loader.global_batch * cfg.train.seq_len, flops_per_token(plan.model, cfg.train.seq_len),
                           peak, d.world_size, base_mem_gb)  # fmt: skip
    validator = Validator(cfg.train, val, val_sources, plan.token_bytes)
    components += [monitor, validator]
    if cfg.eval.downstream:  # after validation: both add to the same step's metrics
        every = cfg.eval.downstream_every or cfg.train.eval_every
        components.append(DownstreamEval(cfg.eval, every, cfg.train.max_steps, load_tokenizer(cfg.tokenizer),
                                         plan.model.max_seq_len, cfg.train.micro_batch_size))  # fmt: skip
    components += [Preemption(list(cfg.checkpoint.preemption_signals),
                                                  cfg.checkpoint.preemption_grace_s)]  # fmt: skip
    loggers: list[Callback] = []
    if d.is_main:
        resolved = write_run_files(plan, raw)
        run_dir = Path(cfg.run.dir)
        # What ran the job, for the model card's hardware and device-hours (train.export); rewritten on resume.
        nodes = int(os.environ.get("GROUP_WORLD_SIZE", "0")) or None
        hardware = {"device": accelerator.device_name(d.device), "device_type": d.device.type,
                    "world_size": d.world_size, "nodes": nodes}  # fmt: skip
        (run_dir / "hardware.json").write_text(json.dumps(hardware, indent=2))
        loggers.append(MetricsJsonl(run_dir))
        if cfg.logging.wandb.mode != "disabled":
            loggers.append(Wandb(cfg.logging, run_dir, {**resolved, "data_bom": bom_summary(plan.manifest)},
                                 cfg.run.name))  # fmt: skip
        if cfg.logging.progress:
            loggers.append(Progress(cfg.train.max_steps, 0))
    objective = Objective(cfg.train.moe, cfg.train.mtp, d.device)
    trainer = Trainer(cfg.train, cfg.logging.log_every, d, engine, loader, objective, checkpointer,
                      components + loggers)  # fmt: skip
    trainer.monitor, trainer.validator = monitor, validator
    return trainer, loggers
