"""Analytic training FLOPs of the decoder, for MFU."""

from __future__ import annotations

from model.config import ModelConfig


def _attn_params(cfg: ModelConfig) -> int:
    d, H = cfg.d_model, cfg.n_heads
    if cfg.attention == "gqa":
        hd = cfg.head_dim
        return d * H * hd * 2 + d * cfg.n_kv_heads * hd * 2  # q, o + k, v
    qk = H * (cfg.qk_nope_head_dim + cfg.qk_rope_head_dim)
    q = d * qk if cfg.q_lora_rank is None else d * cfg.q_lora_rank + cfg.q_lora_rank * qk
    kv = d * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) + cfg.kv_lora_rank * H * (cfg.qk_nope_head_dim + cfg.v_head_dim)
    return q + kv + H * cfg.v_head_dim * d


def _mlp_params(cfg: ModelConfig, layer_idx: int) -> int:
    """Matmul weights one token passes through in this layer's MLP: dense, or router + shared + top_k experts."""
    d, m = cfg.d_model, cfg.moe
    if not cfg.is_moe_layer(layer_idx):
        return 3 * d * cfg.ffn_hidden
    return d * m.n_routed_experts + 3 * d * m.ffn_hidden * (m.n_shared_experts + m.top_k)


def activated_params(cfg: ModelConfig) -> int:
    """Matmul weights activated per token: attention and MLP of every layer (only the top_k routed experts), the
    MTP modules, and the output head once per prediction (main + each MTP depth). Norms and the embedding lookup
    are free."""
    if cfg.vocab_size <= 0:
        raise ValueError(f"model.vocab_size={cfg.vocab_size}: set it before counting FLOPs")
    d = cfg.d_model
    n = sum(_attn_params(cfg) + _mlp_params(cfg, i) for i in range(cfg.n_layers))
    for k in range(cfg.mtp.depth):
        n += 2 * d * d + _attn_params(cfg) + _mlp_params(cfg, cfg.n_layers + k)  # eh_proj + block
    return n + d * cfg.vocab_size * (1 + cfg.mtp.depth)


def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Training (forward + backward) FLOPs per token at context seq_len: 6 * N_activated + attention.

    N counts every weight a token's forward multiplies with (see `activated_params`; for a dense model that is every
    q/k/v/o and gate/up/down weight plus lm_head, counted even when tied to the embedding). The attention term is
    q k^T and probs v: 2 FLOPs * n_heads * (qk_head_dim + v_head_dim) * T per token and layer, times 3 for forward +
    backward; for GQA qk = v = head_dim, i.e. 12 * L * H * hd * T. As in PaLM (appendix B) and Megatron, the causal
    mask is *not* halved, so MFU is comparable with numbers quoted that way.
    """
    n_matmul = activated_params(cfg)
    if cfg.attention == "mla":
        per_head = cfg.qk_nope_head_dim + cfg.qk_rope_head_dim + cfg.v_head_dim
    else:
        per_head = 2 * cfg.head_dim
    n_attn_layers = cfg.n_layers + cfg.mtp.depth
    return 6.0 * n_matmul + 6.0 * n_attn_layers * cfg.n_heads * per_head * seq_len
