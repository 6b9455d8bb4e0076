"""Turn a validated PretrainConfig into the objects of a run: `plan_run` checks everything that can fail from
config and files alone, before any collective; `build_trainer` assembles the engine, the data and the components."""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from data_pipeline.bom import bom_summary
from data_pipeline.loader import DistributedBatchLoader, PackedSequences
from data_pipeline.shards import changed_shards, check_shards, read_manifest
from model import accelerator
from model.attention import load_flash_attn
from model.config import ExecutionConfig, ModelConfig
from model.flops import flops_per_token
from model.transformer import Transformer
from tokenizer.hf_tokenizer import load_any
from train.callbacks import faults
from train.callbacks.base import Callback
from train.callbacks.downstream import DownstreamEval
from train.callbacks.heartbeat import Heartbeat
from train.callbacks.loggers import MetricsJsonl, Progress, Wandb
from train.callbacks.moe import MoEBalance
from train.callbacks.monitor import SpeedMonitor
from train.callbacks.preemption import Preemption, PreemptionHandler
from train.callbacks.qk_clip import QKClip
from train.callbacks.stability import StabilityGuard
from train.checkpoint.compat import check_compatible, model_meta, needs_universal
from train.checkpoint.init_from_hf import HFInit, build_from_hf, plan_hf_init
from train.checkpoint.layout import latest_tag, read_meta, step_of
from train.checkpoint.manager import Checkpointer
from train.checkpoint.run_lock import RunLock
from train.config import PretrainConfig
from train.engine import distributed, expert_parallel, model_parallel
from train.engine.deepspeed_engine import Engine, build_engine, deepspeed_config, resolve_dtype
from train.engine.distributed import Dist
from train.engine.muon import HeadMaxima, check_optimizer, row_scaler
from train.engine.optimize import check_fp8, optimize_model
from train.engine.pipeline import PipelineEngine
from train.secrets import redact
from train.trainer.layout import BatchLayout, make_layout
from train.trainer.objective import Objective
from train.trainer.parallel import ParallelLayout
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
    parallel: ParallelLayout = ParallelLayout(1)
    load_universal: bool = False
    """The checkpoint was saved with another world size or ZeRO stage: load it through DeepSpeed's universal format."""
    hf_init: HFInit | None = None
    """init.from_hf: the base model's weights and how they map (used when no checkpoint is resumed)."""
    token_bytes: list[int] | None = None
    """UTF-8 bytes of each token id's text (the tokenizer's `token_bytes()`), for val_bpb; None: not reported."""


def plan_run(cfg: PretrainConfig, world_size: int) -> Plan:
    """Check the config against the tokenizer, the prepared data and any checkpoint in run.dir."""
    accelerator.check_requested_gpus()  # a CPU torch on a GPU node must not fall back to gloo on CPU silently
    if not cfg.run.dir or cfg.run.dir == "???":
        raise ValueError("set run.dir=DIR: where this run writes config.yaml, metrics.jsonl and checkpoints/")
    if not cfg.tokenizer.path:
        raise ValueError("set tokenizer.path=DIR: a tokenizer trained by `python -m tokenizer.train`")
    if not cfg.data.path:
        raise ValueError("set data.path=DIR: token shards written by `python -m data_pipeline.prepare`")
    tok = load_any(cfg.tokenizer.path)
    manifest = read_manifest(cfg.data.path)
    if manifest["tokenizer"]["sha256"] != tok.sha256:
        raise ValueError(
            f"data.path={cfg.data.path} was tokenized with tokenizer sha256 {manifest['tokenizer']['sha256'][:12]}…, "
            f"but tokenizer.path={cfg.tokenizer.path} has {tok.sha256[:12]}…: re-run prepare with this tokenizer, or "
            "point tokenizer.path at the one the data was made with"
        )
    check_shards(cfg.data.path, manifest, cfg.data.verify_hashes)  # a damaged shard never trains silently
    model = cfg.model
    hf_init = None
    if cfg.init.from_hf:
        hf_init = plan_hf_init(cfg.init, model, tok, cfg.tokenizer.path)
        model = hf_init.model
        if model.moe.enabled and cfg.parallel.ep_size > 1 and cfg.deepspeed.zero_stage == 3:
            raise ValueError("init.from_hf with parallel.ep_size > 1 under deepspeed.zero_stage=3 is not supported "
                             "yet: use zero_stage 1-2 with expert parallelism, or ep_size=1")  # fmt: skip
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
    par = cfg.parallel
    parallel = ParallelLayout(world_size, par.tp_size, par.sp_size, par.pp_size, ep_size)
    parallel.check(model, cfg.train.seq_len, cfg.deepspeed.zero_stage)
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
    bf16 = cfg.train.dtype == "bf16" or (cfg.train.dtype == "auto" and accelerator.has_accelerator())
    check_optimizer(cfg.optim, cfg.deepspeed.zero_stage, cfg.deepspeed.offload_optimizer, bf16,
                    parallel.tp, parallel.sp, parallel.pp, model.qk_norm)  # fmt: skip
    layout = make_layout(cfg.train.global_batch_tokens, cfg.train.seq_len, cfg.train.micro_batch_size, parallel.dp)
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
        check_compatible(meta, model, tok.sha256, ckpt_dir / tag)
        universal = needs_universal(
            meta, world_size, cfg.deepspeed.zero_stage, ckpt_dir / tag, parallel.tp, parallel.pp, ep_size
        )
        check_data_unchanged(ckpt_dir / tag, manifest, cfg)
    token_bytes = tok.token_bytes() if hasattr(tok, "token_bytes") else None
    return Plan(cfg, model, layout, manifest, tok.sha256, tag, parallel, universal, hf_init, token_bytes)


def lock_run_dir(cfg: PretrainConfig) -> RunLock | None:
    """Rank 0 holds RUN_DIR/run.lock until the end of the launch (RunDirBusy, a user error, when another run holds
    it); the other ranks return None and wait for rank 0 in the rendezvous."""
    if os.environ.get("RANK", "0") != "0" or not cfg.run.dir or cfg.run.dir == "???":
        return None  # plan_run names a missing run.dir
    lock = RunLock(cfg.run.dir, cfg.run.lock_stale_s)
    lock.acquire()
    return lock


def check_data_unchanged(tag_dir: Path, manifest: dict, cfg: PretrainConfig) -> None:
    """Resume: compare the training shards with those the checkpoint was trained on (its bom.json). Refuse when the
    saved data position no longer fits (another number of sequences), naming the shards that changed; warn when
    only their contents changed (the position fits, but the rest of the epoch is other data)."""
    bom = tag_dir / "bom.json"
    if not bom.is_file():  # saved without data.path's manifest: the loader still checks the sequence count
        return
    saved = json.loads(bom.read_text())
    changed = changed_shards(saved, manifest)
    if not changed:
        return
    seq_len = cfg.train.seq_len
    before = max(0, (saved["splits"]["train"]["tokens"] - 1) // seq_len)
    now = max(0, (manifest["splits"]["train"]["tokens"] - 1) // seq_len)
    what = "; ".join(changed)
    if before != now:
        raise ValueError(
            f"checkpoint {tag_dir} saved its data position in {before:,} training sequences of {seq_len} tokens, "
            f"but data.path={cfg.data.path} now holds {now:,}: changed since that checkpoint: {what}. Resume with the "
            "data it was trained on, or start a new run.dir"
        )
    if os.environ.get("RANK", "0") == "0":
        print(f"[pretrain] warning: training shards changed since checkpoint {tag_dir.name} ({what}); the data "
              "position still fits, so training resumes on the new contents", file=sys.stderr)  # fmt: skip


def set_threads(cfg: PretrainConfig, local_world_size: int) -> None:
    """On CPU, share the cores between the ranks of this node instead of oversubscribing them."""
    if not accelerator.has_accelerator():
        n = cfg.train.threads_per_rank or max(1, (os.cpu_count() or 1) // local_world_size)
        torch.set_num_threads(n)


def device_peak_flops(cfg: PretrainConfig, d: Dist) -> float:
    """One rank's peak FLOP/s for MFU (`train.peak_tflops`, else accelerator.peak_flops), the same on every rank.

    Called after set_threads, so a CPU rank measures with the threads it trains with. The ranks measure together
    after a barrier, so the cores they share are shared as in training and no rank's figure is taken while another
    still builds its engine; the highest figure is used on every rank: a measurement slowed by other work would
    understate the peak and overstate MFU."""
    if cfg.train.peak_tflops:
        return cfg.train.peak_tflops * 1e12
    distributed.barrier()
    return max(distributed.all_gather_object(accelerator.peak_flops(d.device, torch.get_num_threads())))


def build_model(model: ModelConfig, execution: ExecutionConfig, ep_size: int, seed: int, zero_stage: int,
                sp_size: int = 1, hf_init: HFInit | None = None, ds_config: dict | None = None,
                pp_size: int = 1, tp_size: int = 1):  # fmt: skip
    """Same seed on every rank, so every rank starts from identical weights (and, with expert parallelism, from
    its slices of the same experts). With ep_size > 1 this creates the expert groups (inside each pipeline stage
    when pp_size > 1, per tensor-parallel rank when tp_size > 1), with sp_size > 1 the sequence-parallel groups
    (collectives). Tensor parallelism shards the model later, in deepspeed.initialize. With hf_init the weights are
    the base model's instead (tp_size > 1: sharded here, before loading, and the tensor-parallel groups created;
    otherwise ds_config given under ZeRO-3: built partitioned; see train.checkpoint.init_from_hf)."""
    ep_size = ep_size if model.moe.enabled else 1
    sp_group, shard = model_parallel.init_sequence_parallel(sp_size) if sp_size > 1 else (None, None)
    dispatcher = expert_parallel.make_dispatcher(ep_size, pp_size, tp_size)
    torch.manual_seed(seed)
    if hf_init is not None:
        module = build_from_hf(hf_init, execution, dispatcher, ds_config, shard, tp_size)
    else:
        module = Transformer(model, execution, dispatcher, shard)
    if dispatcher is not None:
        expert_parallel.prepare_model(module, ep_size, zero_stage, tp_size)
    if sp_group is not None:
        model_parallel.wrap_attention(module, sp_group)
    return optimize_model(module, execution.compile, execution.fp8)


def build_data(plan: Plan, rank: int, world_size: int):
    """The training loader, the whole validation split, and each source's validation part (when big enough).
    `rank` / `world_size` are data-parallel: which batch, of how many."""
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


def build_trainer(plan: Plan, raw: DictConfig, d: Dist, base_mem_gb: float,
                  stop: PreemptionHandler | None = None) -> tuple[Trainer, list[Callback]]:  # fmt: skip
    """The engine, the data and every component of the run, registered with a Trainer; returns it and the
    loggers (rank 0) that must be closed at the end. `stop`: the stop-signal handler, when installed earlier."""
    cfg, par = plan.cfg, plan.parallel
    hf_init = plan.hf_init if plan.resume_tag is None else None  # a resumed run takes its checkpoint's weights
    ds_config = None
    if hf_init is not None and cfg.deepspeed.zero_stage == 3 and par.tp == 1:  # tp > 1 builds sharded instead
        ds_config = deepspeed_config(cfg.deepspeed, cfg.optim, plan.layout, resolve_dtype(cfg.train, d.device))
    model = build_model(plan.model, cfg.execution, cfg.parallel.ep_size, cfg.train.seed, cfg.deepspeed.zero_stage,
                        par.sp, hf_init, ds_config, par.pp, par.tp)  # fmt: skip
    ds_engine, _, scheduler = build_engine(model, cfg.train, cfg.optim, cfg.deepspeed, plan.layout, d,
                                           plan.load_universal, par.tp, par.sp, par.pp)  # fmt: skip
    dp_rank = par.dp_rank(d.rank)
    if par.pp > 1:
        engine = PipelineEngine(ds_engine, scheduler, cfg.deepspeed.zero_stage, dp_rank, par.dp, model)
    else:
        engine = Engine(ds_engine, scheduler, cfg.deepspeed.zero_stage, dp_rank, par.dp, par.sp)
    loader, val, val_sources = build_data(plan, dp_rank, par.dp)
    meta = model_meta(plan.model, plan.tokenizer_sha256, cfg.execution, zero_stage=cfg.deepspeed.zero_stage,
                      world_size=d.world_size, ep_size=cfg.parallel.ep_size if plan.model.moe.enabled else 1,
                      seq_len=cfg.train.seq_len, data_path=str(cfg.data.path), tp_size=par.tp, sp_size=par.sp,
                      pp_size=par.pp, tokenizer_path=str(cfg.tokenizer.path),
                      **({"base_model": plan.hf_init.meta} if plan.hf_init else {}))  # fmt: skip
    debug = faults.active(cfg.debug)
    kill_points = faults.KillDuringSave(cfg.debug.kill_during_save_at) if debug else None
    checkpointer = Checkpointer(Path(cfg.run.dir) / "checkpoints", cfg.checkpoint, meta, kill_points)
    peak = device_peak_flops(cfg, d)
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
    qk = cfg.optim.qk_clip
    if qk.enabled or qk.log_max_logit:  # before the validator: its forwards must not count as the step's logits
        components.append(QKClip(qk, row_scaler(ds_engine), HeadMaxima(par.tp)))
    validator = Validator(cfg.train, val, val_sources, plan.token_bytes)
    components += [monitor, validator]
    if cfg.eval.downstream:  # after validation: both add to the same step's metrics
        every = cfg.eval.downstream_every or cfg.train.eval_every
        components.append(DownstreamEval(cfg.eval, every, cfg.train.max_steps, load_any(cfg.tokenizer.path),
                                         plan.model.max_seq_len, cfg.train.micro_batch_size))  # fmt: skip
    components.append(Preemption(list(cfg.checkpoint.preemption_signals), cfg.checkpoint.preemption_grace_s, stop))
    loggers: list[Callback] = []
    if d.is_main:
        resolved = write_run_files(plan, raw)
        run_dir = Path(cfg.run.dir)
        # What ran the job, for the model card's hardware and device-hours (train.export); rewritten on resume.
        nodes = int(os.environ.get("GROUP_WORLD_SIZE", "0")) or None
        hardware = {"device": accelerator.device_name(d.device), "device_type": d.device.type,
                    "world_size": d.world_size, "nodes": nodes}  # fmt: skip
        (run_dir / "hardware.json").write_text(json.dumps(hardware, indent=2))
        resume_step = (step_of(plan.resume_tag) or 0) if plan.resume_tag else 0
        metrics = MetricsJsonl(run_dir, resume_step)
        loggers.append(metrics)
        if cfg.logging.wandb.mode != "disabled":
            loggers.append(Wandb(cfg.logging, run_dir, {**resolved, "data_bom": bom_summary(plan.manifest)},
                                 cfg.run.name, rewound_to=resume_step if metrics.dropped else None))  # fmt: skip
        if cfg.logging.progress:
            loggers.append(Progress(cfg.train.max_steps, 0))
    objective = Objective(cfg.train.moe, cfg.train.mtp, d.device, par.sp, pipeline=par.pp > 1)
    trainer = Trainer(cfg.train, cfg.logging.log_every, d, engine, loader, objective, checkpointer,
                      components + loggers)  # fmt: skip
    trainer.monitor, trainer.validator = monitor, validator
    return trainer, loggers
