"""Export a `model.transformer.Transformer` state dict as a Hugging Face `LlamaForCausalLM` directory."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

import torch

from model.config import ModelConfig

if TYPE_CHECKING:
    import transformers


def hf_llama_config(cfg: ModelConfig, *, bos_id: int, eos_id: int, pad_id: int) -> transformers.LlamaConfig:
    """LlamaConfig (fp32, no biases, silu) describing the same network as cfg."""
    from transformers import LlamaConfig

    if cfg.vocab_size <= 0:
        raise ValueError(f"model.vocab_size={cfg.vocab_size}: set it before exporting")
    for key, value in (("bos_id", bos_id), ("eos_id", eos_id), ("pad_id", pad_id)):
        # A SentencePiece "disabled" id of -1 would silently become padding_idx = vocab_size - 1 in HF.
        if not 0 <= value < cfg.vocab_size:
            raise ValueError(f"{key}={value} is not a token id of a {cfg.vocab_size}-token vocabulary")
    return LlamaConfig(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.d_model,
        intermediate_size=cfg.ffn_hidden,
        num_hidden_layers=cfg.n_layers,
        num_attention_heads=cfg.n_heads,
        num_key_value_heads=cfg.n_kv_heads,
        head_dim=cfg.head_dim,
        hidden_act="silu",
        max_position_embeddings=cfg.max_seq_len,
        initializer_range=cfg.init_std,
        rms_norm_eps=cfg.norm_eps,
        # transformers 5 keeps rope_theta inside rope_parameters (a top-level rope_theta is only a BC alias).
        rope_parameters={"rope_type": "default", "rope_theta": float(cfg.rope_theta)},
        attention_bias=False,
        attention_dropout=0.0,
        mlp_bias=False,
        tie_word_embeddings=cfg.tie_embeddings,
        bos_token_id=bos_id,
        eos_token_id=eos_id,
        pad_token_id=pad_id,
        dtype="float32",  # `torch_dtype` in transformers 4
    )


def to_hf_state_dict(sd: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Our names -> LlamaForCausalLM names (`model.` prefix except lm_head); lm_head.weight dropped when tied."""
    out = {}
    for name, tensor in sd.items():
        if name == "lm_head.weight":
            if not cfg.tie_embeddings:
                out[name] = tensor
        else:
            out[f"model.{name}"] = tensor
    return out


def save_hf_model(
    out_dir: str | os.PathLike, sd: dict[str, torch.Tensor], cfg: ModelConfig, *, bos_id: int, eos_id: int, pad_id: int
) -> None:
    """Write config.json, generation_config.json and model.safetensors (fp32) for `from_pretrained(out_dir)`."""
    from transformers import GenerationConfig, LlamaForCausalLM

    config = hf_llama_config(cfg, bos_id=bos_id, eos_id=eos_id, pad_id=pad_id)
    hf_sd = to_hf_state_dict(sd, cfg)
    if cfg.tie_embeddings:
        # LlamaForCausalLM.state_dict() lists the tied lm_head too; give it the same tensor so strict loading
        # checks every other name. save_pretrained writes the shared tensor once.
        hf_sd["lm_head.weight"] = hf_sd["model.embed_tokens.weight"]
    with torch.device("meta"):
        # Skip the random init of a model that is fully overwritten next.
        model = LlamaForCausalLM(config)
    model.load_state_dict({k: v.detach().to("cpu", torch.float32) for k, v in hf_sd.items()}, strict=True, assign=True)
    if cfg.tie_embeddings:
        model.tie_weights()  # assign=True replaced both Parameters; make them one again
    model.generation_config = GenerationConfig(bos_token_id=bos_id, eos_token_id=eos_id, pad_token_id=pad_id)
    model.save_pretrained(out_dir, safe_serialization=True)
