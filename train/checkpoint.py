"""DeepSpeed checkpoints plus what resuming and exporting need: full weights (safetensors), meta.json, RNG states.

Layout of RUN_DIR/checkpoints/:
    latest                      DeepSpeed's pointer to the newest complete tag (written last)
    step_00000050/              one tag per saved step
        mp_rank_*_model_states.pt, *_optim_states.pt   DeepSpeed: model, optimizer, LR schedule, client state
        model.safetensors       full fp32 weights with our parameter names (read by evaluate and export)
        meta.json               step, model config, tokenizer sha256, batch layout, ZeRO stage
        rng_rank{R}.pt          each rank's torch / numpy / python RNG states
        bom.json                the training data's bill of materials (data.path/manifest.json, copied)
"""

from __future__ import annotations

import json
import random
import shutil
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from data_pipeline.shards import MANIFEST
from model.config import ModelConfig

SHAPE_KEYS = (
    "vocab_size",
    "d_model",
    "n_layers",
    "n_heads",
    "n_kv_heads",
    "ffn_hidden",
    "tie_embeddings",
    "attention",
    "q_lora_rank",
    "kv_lora_rank",
    "qk_nope_head_dim",
    "qk_rope_head_dim",
    "v_head_dim",
    "moe.enabled",
    "moe.n_routed_experts",
    "moe.n_shared_experts",
    "moe.ffn_hidden",
    "moe.first_k_dense",
    "mtp.depth",
)
"""Model fields a checkpoint's weights depend on (dotted for nested configs); resuming with another value fails."""


def _field(obj, dotted: str, default=None):
    """Value of a dotted field in a dataclass or a (meta) dict; `default` where a dict lacks it."""
    for part in dotted.split("."):
        if isinstance(obj, dict):
            if part not in obj:
                return default
            obj = obj[part]
        else:
            obj = getattr(obj, part)
    return obj


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def latest_tag(ckpt_dir: Path) -> str | None:
    """The tag named by `latest`, if that checkpoint has its meta.json; else None."""
    pointer = ckpt_dir / "latest"
    if not pointer.is_file():
        return None
    tag = pointer.read_text().strip()
    if not (ckpt_dir / tag / "meta.json").is_file():
        raise FileNotFoundError(
            f"{pointer} names checkpoint {tag!r}, which is incomplete (no meta.json): delete {pointer} to fall back "
            "to an older tag by hand, or start a new run.dir"
        )
    return tag


def read_meta(ckpt_dir: Path, tag: str) -> dict:
    return json.loads((ckpt_dir / tag / "meta.json").read_text())


def check_compatible(meta: dict, model: ModelConfig, tokenizer_sha256: str, where: Path) -> None:
    """Refuse to resume a checkpoint of another model shape or tokenizer, naming every difference."""
    saved = meta["model"]
    # Checkpoints written before a field existed hold its default (e.g. dense GQA before MLA and MoE).
    defaults = ModelConfig()
    diffs = [
        f"model.{k}: checkpoint {_field(saved, k, _field(defaults, k))!r}, config {_field(model, k)!r}"
        for k in SHAPE_KEYS
        if _field(saved, k, _field(defaults, k)) != _field(model, k)
    ]
    if diffs:
        raise ValueError(
            f"cannot resume from {where}: it holds a model of another shape ({'; '.join(diffs)}). "
            "Use the model config it was trained with, or a new run.dir"
        )
    saved_ep = _field(saved, "moe.ep_size", 1) if _field(saved, "moe.enabled", False) else 1
    ep = model.moe.ep_size if model.moe.enabled else 1
    if saved_ep != ep:
        raise ValueError(
            f"cannot resume from {where} with model.moe.ep_size={ep}: it was saved with ep_size={saved_ep}, and "
            "DeepSpeed's optimizer partitions of expert weights depend on it. Resume with "
            f"model.moe.ep_size={saved_ep}, or start a new run.dir from its exported weights"
        )
    if meta.get("tokenizer_sha256") != tokenizer_sha256:
        raise ValueError(
            f"cannot resume from {where}: it was trained with tokenizer sha256 {meta.get('tokenizer_sha256')}, "
            f"but tokenizer.path now has {tokenizer_sha256}. Use the original tokenizer, or a new run.dir"
        )


def rng_state() -> dict:
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy_keys": torch.from_numpy(np_state[1].astype(np.int64)),
        "numpy_pos": int(np_state[2]),
        "python": list(random.getstate()[1]),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(("MT19937", state["numpy_keys"].numpy().astype(np.uint32), state["numpy_pos"], 0, 0.0))
    random.setstate((3, tuple(state["python"]), None))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def save(engine, ckpt_dir: Path, step: int, client_state: dict, meta: dict, full_weights: dict | None, keep_last: int):
    """Collective save: our files first, then DeepSpeed's, whose `latest` pointer moves last."""
    from safetensors.torch import save_file

    tag = tag_for(step)
    tag_dir = ckpt_dir / tag
    rank = dist.get_rank()
    if rank == 0:
        tag_dir.mkdir(parents=True, exist_ok=True)
        save_file(full_weights, str(tag_dir / "model.safetensors"), metadata={"format": "pt"})
        (tag_dir / "meta.json").write_text(json.dumps({**meta, "step": step, "tag": tag}, indent=2))
        # The bill of materials travels with the weights, so a checkpoint alone shows what it was trained on.
        bom = Path(meta["data_path"]) / MANIFEST if meta.get("data_path") else None
        if bom is not None and bom.is_file():
            shutil.copyfile(bom, tag_dir / "bom.json")
    dist.barrier()
    torch.save(rng_state(), tag_dir / f"rng_rank{rank}.pt")
    engine.save_checkpoint(str(ckpt_dir), tag=tag, client_state=client_state)
    dist.barrier()
    if rank == 0 and keep_last > 0:
        tags = sorted(p for p in ckpt_dir.glob("step_*") if p.is_dir())
        for old in tags[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    dist.barrier()


def load(engine, ckpt_dir: Path, tag: str) -> dict:
    """Restore model, optimizer, LR schedule and this rank's RNG; return the client state."""
    path, client_state = engine.load_checkpoint(
        str(ckpt_dir), tag=tag, load_optimizer_states=True, load_lr_scheduler_states=True
    )
    if path is None:
        raise FileNotFoundError(f"DeepSpeed could not load checkpoint {ckpt_dir / tag}")
    if any(getattr(p, "allreduce", True) is False for p in engine.module.parameters()):
        from train.expert_parallel import load_local_experts

        load_local_experts(engine.module, str(ckpt_dir / tag / "model.safetensors"))
    rng_file = ckpt_dir / tag / f"rng_rank{dist.get_rank()}.pt"
    if rng_file.is_file():
        set_rng_state(torch.load(rng_file, weights_only=True))
    return client_state


def load_full_weights(run_dir: Path, tag: str | None = None) -> tuple[dict[str, torch.Tensor], dict]:
    """Full weights and meta of a run's checkpoint (latest by default), without DeepSpeed or pickle."""
    from safetensors.torch import load_file

    ckpt_dir = Path(run_dir) / "checkpoints"
    tag = tag or latest_tag(ckpt_dir)
    if tag is None:
        raise FileNotFoundError(f"no checkpoint under {ckpt_dir}: train first, or fix run.dir")
    weights = ckpt_dir / tag / "model.safetensors"
    if not weights.is_file():
        raise FileNotFoundError(f"checkpoint {ckpt_dir / tag} has no model.safetensors")
    return load_file(str(weights)), read_meta(ckpt_dir, tag)


def model_meta(model: ModelConfig, tokenizer_sha256: str, **extra) -> dict:
    return {"model": asdict(model), "tokenizer_sha256": tokenizer_sha256, **extra}


def load_model(run_dir: str | Path, tag: str | None = None):
    """Our Transformer with a run's checkpoint weights (latest by default), in eval mode; returns (model, meta)."""
    from model.transformer import Transformer

    state, meta = load_full_weights(Path(run_dir), tag)
    cfg = ModelConfig.from_dict(meta["model"])
    model = Transformer(cfg)
    missing, unexpected = model.load_state_dict(state, strict=False)
    allowed_missing = {"lm_head.weight"} if cfg.tie_embeddings else set()
    if unexpected or set(missing) - allowed_missing:
        raise ValueError(f"checkpoint weights do not fit the model: missing {missing}, unexpected {unexpected}")
    return model.eval(), meta
