"""Typed configuration of a decoder model (the `model/` Hydra group)."""

from __future__ import annotations

from dataclasses import dataclass

ATTN_BACKENDS = ("sdpa", "flash_attn", "eager")


@dataclass
class ModelConfig:
    """Shape and numerics of a Llama-style dense decoder."""

    name: str = "tiny"
    """Registry name, recorded in checkpoints and exports."""
    vocab_size: int = 0
    """Embedding rows; 0 takes the tokenizer's vocabulary size at build time."""
    d_model: int = 256
    """Hidden size."""
    n_layers: int = 4
    n_heads: int = 4
    """Query heads; head_dim = d_model // n_heads."""
    n_kv_heads: int = 2
    """Key/value heads for grouped-query attention; must divide n_heads."""
    ffn_hidden: int = 704
    """SwiGLU intermediate size."""
    max_seq_len: int = 2048
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = True
    """Share the input embedding with the output head."""
    attn_backend: str = "sdpa"
    """sdpa (default), flash_attn (needs the flash-attn package and a CUDA GPU) or eager (reference)."""
    init_std: float = 0.02

    def __post_init__(self) -> None:
        if self.attn_backend not in ATTN_BACKENDS:
            raise ValueError(f"model.attn_backend={self.attn_backend!r}: choose one of {ATTN_BACKENDS}")
        if self.d_model % self.n_heads:
            raise ValueError(f"model.d_model={self.d_model} is not divisible by model.n_heads={self.n_heads}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"model.n_heads={self.n_heads} is not divisible by model.n_kv_heads={self.n_kv_heads}")
        if (self.d_model // self.n_heads) % 2:
            raise ValueError("model head_dim (d_model // n_heads) must be even for RoPE")
        for key in ("n_layers", "n_heads", "n_kv_heads", "ffn_hidden", "max_seq_len", "d_model"):
            if getattr(self, key) <= 0:
                raise ValueError(f"model.{key} must be positive, got {getattr(self, key)}")
        if self.vocab_size < 0:
            raise ValueError(f"model.vocab_size must be >= 0 (0 = from tokenizer), got {self.vocab_size}")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads
