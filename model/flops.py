"""Analytic training FLOPs of the decoder, for MFU."""

from __future__ import annotations

from model.config import ModelConfig


def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    """Training (forward + backward) FLOPs per token at context seq_len: 6 * N + 12 * L * H * Q * T.

    N counts every weight that takes part in a matmul: per layer q/k/v/o and gate/up/down, plus lm_head (d_model *
    vocab, counted even when tied to the embedding, whose lookup is free). Norm weights are left out. The second term
    is q k^T and probs v (2 matmuls * 2 FLOPs * H*Q * T per token and layer, times 3 for forward + backward) with
    H*Q = n_heads * head_dim. As in PaLM (appendix B) and Megatron, the causal mask is *not* halved, so MFU is
    comparable with numbers quoted that way.
    """
    if cfg.vocab_size <= 0:
        raise ValueError(f"model.vocab_size={cfg.vocab_size}: set it before counting FLOPs")
    d, hd = cfg.d_model, cfg.head_dim
    attn = d * cfg.n_heads * hd * 2 + d * cfg.n_kv_heads * hd * 2  # q, o + k, v
    mlp = 3 * d * cfg.ffn_hidden  # gate, up, down
    n_matmul = cfg.n_layers * (attn + mlp) + d * cfg.vocab_size
    return 6.0 * n_matmul + 12.0 * cfg.n_layers * cfg.n_heads * hd * seq_len
