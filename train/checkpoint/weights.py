"""Weights of a run's checkpoint for read-only tools (evaluate, export, lm_eval): no DeepSpeed, no pickle."""

from __future__ import annotations

from pathlib import Path

import torch

from model.config import ModelConfig
from model.transformer import Transformer
from train.checkpoint.layout import latest_tag, read_meta, verify


def load_full_weights(run_dir: Path, tag: str | None = None) -> tuple[dict[str, torch.Tensor], dict]:
    """Full weights and meta of a run's checkpoint (latest by default), from its model.safetensors."""
    from safetensors.torch import load_file

    ckpt_dir = Path(run_dir) / "checkpoints"
    if tag is None:
        tag = latest_tag(ckpt_dir)
        if tag is None:
            raise FileNotFoundError(f"no complete checkpoint under {ckpt_dir}: train first, or fix run.dir")
    elif (reason := verify(ckpt_dir / tag)) is not None:
        raise ValueError(f"checkpoint {ckpt_dir / tag} is incomplete or damaged: {reason}. Choose another tag")
    weights = ckpt_dir / tag / "model.safetensors"
    if not weights.is_file():
        raise FileNotFoundError(f"checkpoint {ckpt_dir / tag} has no model.safetensors")
    return load_file(str(weights)), read_meta(ckpt_dir, tag)


def load_model(run_dir: str | Path, tag: str | None = None):
    """Our Transformer with a run's checkpoint weights (latest by default), in eval mode; returns (model, meta)."""
    state, meta = load_full_weights(Path(run_dir), tag)
    model = Transformer(ModelConfig.from_dict(meta["model"]))
    missing, unexpected = model.load_state_dict(state, strict=False)
    allowed_missing = {"lm_head.weight"} if model.cfg.tie_embeddings else set()
    if unexpected or set(missing) - allowed_missing:
        raise ValueError(f"checkpoint weights do not fit the model: missing {missing}, unexpected {unexpected}")
    return model.eval(), meta
