"""Causal grouped-query self-attention with three interchangeable kernels (sdpa, flash_attn, eager)."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from model.config import ModelConfig
from model.rope import apply_rotary

FLASH_ATTN_MISSING = (
    "model.attn_backend=flash_attn requested but flash-attn is not installed: install it with "
    "`pip install -e .[flash]` on a CUDA machine, or set model.attn_backend=sdpa"
)


class FlashAttnUnavailableError(ImportError):
    """model.attn_backend=flash_attn was asked for but the flash-attn package cannot be imported."""


def load_flash_attn() -> Callable[..., torch.Tensor]:
    """flash_attn.flash_attn_func, or FlashAttnUnavailableError with the install hint."""
    try:
        from flash_attn import flash_attn_func
    except ImportError as e:
        raise FlashAttnUnavailableError(FLASH_ATTN_MISSING) from e
    return flash_attn_func


def repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """(B, n_kv, T, hd) -> (B, n_kv * n_rep, T, hd), each kv head shared by n_rep consecutive query heads."""
    if n_rep == 1:
        return x
    B, n_kv, T, hd = x.shape
    return x[:, :, None].expand(B, n_kv, n_rep, T, hd).reshape(B, n_kv * n_rep, T, hd)


def eager_causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Reference softmax(q k^T / sqrt(hd) + causal mask) v; q (B, nh, T, hd), k/v (B, n_kv, T, hd)."""
    n_rep = q.size(1) // k.size(1)
    k, v = repeat_kv(k, n_rep), repeat_kv(v, n_rep)
    T = q.size(2)
    scores = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(q.size(-1)))  # (B, nh, T, T)
    mask = torch.ones(T, T, dtype=torch.bool, device=q.device).triu(1)
    scores = scores.masked_fill(mask, float("-inf"))
    # Softmax in fp32 as HF eager does, so bf16 runs of the reference stay a reference.
    probs = F.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    return probs @ v  # (B, nh, T, hd)


class Attention(nn.Module):
    """Llama self-attention: bias-free q/k/v/o projections, RoPE on q and k, causal GQA."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.n_heads = cfg.n_heads
        self.n_kv_heads = cfg.n_kv_heads
        self.head_dim = cfg.head_dim
        self.backend = cfg.attn_backend
        # Fail at build time, not at the first forward of a long job.
        self._flash = load_flash_attn() if self.backend == "flash_attn" else None
        self.q_proj = nn.Linear(cfg.d_model, cfg.n_heads * cfg.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.d_model, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.d_model, cfg.n_kv_heads * cfg.head_dim, bias=False)
        self.o_proj = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.d_model, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """x (B, T, d_model), cos/sin (T, hd) -> (B, T, d_model)."""
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, nh, T, hd)
        k = self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, n_kv, T, hd)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, n_kv, T, hd)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)

        if self.backend == "sdpa":
            # enable_gqa broadcasts kv heads inside the kernel instead of materialising repeat_kv copies.
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=self.n_kv_heads != self.n_heads)
        elif self.backend == "flash_attn":
            # flash-attn wants (B, T, heads, hd) in fp16/bf16 (i.e. under autocast) and handles GQA natively.
            y = self._flash(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=True)  # (B, T, nh, hd)
            y = y.transpose(1, 2)
        else:
            y = eager_causal_attention(q, k, v)
        y = y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim)  # (B, T, nh*hd)
        return self.o_proj(y)
