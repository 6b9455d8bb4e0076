"""Turn a validated PretrainConfig into the objects of a run; every check that can fail runs before any collective."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import torch

from data_pipeline.loader import DistributedBatchLoader, PackedSequences
from data_pipeline.shards import read_manifest
from model.config import ModelConfig
from train import checkpoint
from train.config import PretrainConfig
from train.layout import BatchLayout, make_layout


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


def plan_run(cfg: PretrainConfig, world_size: int) -> Plan:
    """Check the config against the tokenizer, the prepared data and any checkpoint in run.dir."""
    from tokenizer.tokenizer import Tokenizer

    if not cfg.run.dir or cfg.run.dir == "???":
        raise ValueError("set run.dir=DIR: where this run writes config.yaml, metrics.jsonl and checkpoints/")
    if not cfg.tokenizer.path:
        raise ValueError("set tokenizer.path=DIR: a tokenizer trained by `python -m tokenizer.train`")
    if not cfg.data.path:
        raise ValueError("set data.path=DIR: token shards written by `python -m data_pipeline.prepare`")
    tok = Tokenizer.from_dir(cfg.tokenizer.path)
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
    if model.attn_backend == "flex" and not torch.cuda.is_available():
        raise ValueError(
            "model.attn_backend=flex trains on CUDA only (torch has no FlexAttention backward on CPU): "
            "set model.attn_backend=sdpa"
        )
    if model.moe.enabled:
        from train.expert_parallel import check_ep_size

        check_ep_size(model.moe.ep_size, world_size, model.moe.n_routed_experts, cfg.deepspeed.zero_stage)
    if cfg.train.seq_len > model.max_seq_len:
        raise ValueError(f"train.seq_len={cfg.train.seq_len} exceeds model.max_seq_len={model.max_seq_len}")
    if model.attn_backend == "flash_attn":
        from model.attention import load_flash_attn

        load_flash_attn()  # fails here, with its own message, rather than after the processes have started
    if model.activation_checkpointing == "selective" and cfg.deepspeed.zero_stage == 3:
        # ZeRO-3 gathers parameters inside the checkpointed region, so the recompute replays other operators than
        # the forward did and selective checkpointing's operator cache fails in backward.
        raise ValueError(
            "model.activation_checkpointing=selective does not work with deepspeed.zero_stage=3: use "
            "activation_checkpointing=full, or zero_stage 0-2"
        )
    if cfg.train.fp8:
        from train.optimize import check_fp8

        check_fp8()
    layout = make_layout(cfg.train.global_batch_tokens, cfg.train.seq_len, cfg.train.micro_batch_size, world_size)
    ckpt_dir = Path(cfg.run.dir) / "checkpoints"
    tag = checkpoint.latest_tag(ckpt_dir, cfg.checkpoint.verify_hashes)
    universal = False
    if tag is not None:
        # A torchrun restart (--max-restarts) of this same job resumes its own checkpoints even under `never`.
        if cfg.checkpoint.resume == "never" and os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0":
            raise ValueError(
                f"{ckpt_dir} already holds checkpoint {tag} and checkpoint.resume=never: use a new run.dir"
            )
        meta = checkpoint.read_meta(ckpt_dir, tag)
        checkpoint.check_compatible(meta, model, tok.sha256, ckpt_dir / tag)
        universal = checkpoint.needs_universal(meta, world_size, cfg.deepspeed.zero_stage, ckpt_dir / tag)
    return Plan(cfg, model, layout, manifest, tok.sha256, tag, universal)


def set_threads(cfg: PretrainConfig, local_world_size: int) -> None:
    """On CPU, share the cores between the ranks of this node instead of oversubscribing them."""
    if not torch.cuda.is_available():
        n = cfg.train.threads_per_rank or max(1, (os.cpu_count() or 1) // local_world_size)
        torch.set_num_threads(n)


def build_model(model: ModelConfig, seed: int, zero_stage: int = 0):
    """Same seed on every rank, so every rank starts from identical weights (and, with expert parallelism, from
    its slices of the same experts). With model.moe.ep_size > 1 this creates the expert groups (collective)."""
    from model.transformer import Transformer
    from train import expert_parallel

    ep_size = model.moe.ep_size if model.moe.enabled else 1
    dispatcher = expert_parallel.make_dispatcher(ep_size)
    torch.manual_seed(seed)
    module = Transformer(model, dispatcher)
    if dispatcher is not None:
        expert_parallel.prepare_model(module, ep_size, zero_stage)
    return module


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
