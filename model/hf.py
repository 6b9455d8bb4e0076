"""Export a `model.transformer.Transformer` state dict as a Hugging Face `LlamaForCausalLM` (GQA, dense) or
`DeepseekV3ForCausalLM` (MLA, dense or DeepSeekMoE) directory. MTP modules are training-only and are dropped."""

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

    check_ids(cfg, bos_id, eos_id, pad_id)
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


def hf_architecture(cfg: ModelConfig) -> str:
    """The transformers class that represents cfg, or ValueError when none does."""
    if cfg.attention == "mla":
        return "DeepseekV3ForCausalLM"
    if cfg.moe.enabled:
        raise ValueError(
            "export of model.attention=gqa with model.moe.enabled=true is not supported: transformers' "
            "DeepseekV3ForCausalLM needs MLA (model.attention=mla); a dense GQA model exports as LlamaForCausalLM"
        )
    return "LlamaForCausalLM"


def hf_deepseek_config(cfg: ModelConfig, *, bos_id: int, eos_id: int, pad_id: int) -> transformers.DeepseekV3Config:
    """DeepseekV3Config (fp32, non-interleaved RoPE, sigmoid routing normalised over the top-k) describing cfg."""
    from transformers import DeepseekV3Config

    check_ids(cfg, bos_id, eos_id, pad_id)
    m = cfg.moe
    return DeepseekV3Config(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.d_model,
        intermediate_size=cfg.ffn_hidden,
        moe_intermediate_size=m.ffn_hidden,
        num_hidden_layers=cfg.n_layers,
        num_attention_heads=cfg.n_heads,
        num_key_value_heads=cfg.n_heads,
        n_shared_experts=m.n_shared_experts,
        n_routed_experts=m.n_routed_experts,
        routed_scaling_factor=m.route_scale,
        kv_lora_rank=cfg.kv_lora_rank,
        q_lora_rank=cfg.q_lora_rank,
        qk_rope_head_dim=cfg.qk_rope_head_dim,
        v_head_dim=cfg.v_head_dim,
        qk_nope_head_dim=cfg.qk_nope_head_dim,
        n_group=m.n_group,
        topk_group=m.topk_group,
        num_experts_per_tok=m.top_k,
        # A dense model is all "first dense" layers.
        first_k_dense_replace=m.first_k_dense if m.enabled else cfg.n_layers,
        norm_topk_prob=True,
        hidden_act="silu",
        max_position_embeddings=cfg.max_seq_len,
        initializer_range=cfg.init_std,
        rms_norm_eps=cfg.norm_eps,
        rope_parameters={"rope_type": "default", "rope_theta": float(cfg.rope_theta)},
        rope_interleave=False,  # we rotate (first half, second half) pairs, as Llama
        attention_bias=False,
        attention_dropout=0.0,
        tie_word_embeddings=cfg.tie_embeddings,
        num_mtp_layers=0,  # MTP is training-only: its weights are not exported
        bos_token_id=bos_id,
        eos_token_id=eos_id,
        pad_token_id=pad_id,
        dtype="float32",
    )


def check_ids(cfg: ModelConfig, bos_id: int, eos_id: int, pad_id: int) -> None:
    if cfg.vocab_size <= 0:
        raise ValueError(f"model.vocab_size={cfg.vocab_size}: set it before exporting")
    for key, value in (("bos_id", bos_id), ("eos_id", eos_id), ("pad_id", pad_id)):
        # A SentencePiece "disabled" id of -1 would silently become padding_idx = vocab_size - 1 in HF.
        if not 0 <= value < cfg.vocab_size:
            raise ValueError(f"{key}={value} is not a token id of a {cfg.vocab_size}-token vocabulary")


def hf_config(cfg: ModelConfig, *, bos_id: int, eos_id: int, pad_id: int):
    if hf_architecture(cfg) == "DeepseekV3ForCausalLM":
        return hf_deepseek_config(cfg, bos_id=bos_id, eos_id=eos_id, pad_id=pad_id)
    return hf_llama_config(cfg, bos_id=bos_id, eos_id=eos_id, pad_id=pad_id)


def to_hf_state_dict(sd: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Our names -> HF names (`model.` prefix except lm_head); lm_head.weight dropped when tied, `mtp.*` dropped.

    The names are already HF's (Llama, or DeepseekV3 with fused `experts.gate_up_proj` / `experts.down_proj`);
    a MoE with no shared expert gets HF's zero-width shared-expert weights."""
    out = {}
    for name, tensor in sd.items():
        if name.startswith("mtp."):
            continue
        if name == "lm_head.weight":
            if not cfg.tie_embeddings:
                out[name] = tensor
        else:
            out[f"model.{name}"] = tensor
    if cfg.moe.enabled and not cfg.moe.n_shared_experts:
        d = cfg.d_model
        for i in range(cfg.moe.first_k_dense, cfg.n_layers):
            p = f"model.layers.{i}.mlp.shared_experts"
            out[f"{p}.gate_proj.weight"] = out[f"{p}.up_proj.weight"] = torch.zeros(0, d)
            out[f"{p}.down_proj.weight"] = torch.zeros(d, 0)
    return out


def save_hf_model(
    out_dir: str | os.PathLike, sd: dict[str, torch.Tensor], cfg: ModelConfig, *, bos_id: int, eos_id: int, pad_id: int
) -> None:
    """Write config.json, generation_config.json and model.safetensors (fp32) for `from_pretrained(out_dir)`."""
    import transformers
    from transformers import GenerationConfig

    config = hf_config(cfg, bos_id=bos_id, eos_id=eos_id, pad_id=pad_id)
    hf_sd = to_hf_state_dict(sd, cfg)
    if cfg.tie_embeddings:
        # LlamaForCausalLM.state_dict() lists the tied lm_head too; give it the same tensor so strict loading
        # checks every other name. save_pretrained writes the shared tensor once.
        hf_sd["lm_head.weight"] = hf_sd["model.embed_tokens.weight"]
    with torch.device("meta"):
        # Skip the random init of a model that is fully overwritten next.
        model = getattr(transformers, hf_architecture(cfg))(config)
    model.load_state_dict({k: v.detach().to("cpu", torch.float32) for k, v in hf_sd.items()}, strict=True, assign=True)
    if cfg.tie_embeddings:
        model.tie_weights()  # assign=True replaced both Parameters; make them one again
    model.generation_config = GenerationConfig(bos_token_id=bos_id, eos_token_id=eos_id, pad_token_id=pad_id)
    model.save_pretrained(out_dir, safe_serialization=True)
