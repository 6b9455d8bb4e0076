"""Causal grouped-query self-attention with three interchangeable kernels (sdpa, flash_attn, eager)."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from model.config import ModelConfig
from model.norm import RMSNorm
from model.rope import apply_rotary, apply_rotary_qk

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

    _liger = None
    """liger_kernel.transformers.functional when model.kernels=liger (fused RoPE)."""

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
        q, k = apply_rotary_qk(q, k, cos, sin, self._liger)

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


def _attend(backend: str, flash, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """Causal attention of q/k (B, nh, T, dqk) and v (B, nh, T, dv) -> (B, nh, T, dv), any dqk and dv."""
    if backend == "sdpa":
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
    if backend == "flash_attn":
        dqk, dv = q.size(-1), v.size(-1)
        if dv < dqk:  # flash-attn needs one head dim: pad v, slice the output back
            v = F.pad(v, (0, dqk - dv))
        y = flash(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=True, softmax_scale=scale)
        return y.transpose(1, 2)[..., :dv]
    T = q.size(2)
    scores = (q @ k.transpose(-2, -1)) * scale  # (B, nh, T, T)
    mask = torch.ones(T, T, dtype=torch.bool, device=q.device).triu(1)
    probs = F.softmax(scores.masked_fill(mask, float("-inf")), dim=-1, dtype=torch.float32).to(q.dtype)
    return probs @ v


class MLAttention(nn.Module):
    """Multi-head latent attention (DeepSeek-V2/V3), parameter names as HF `DeepseekV3Attention`.

    q = q_proj(x) or q_b_proj(norm(q_a_proj(x))); [c_kv, k_rope] = kv_a_proj_with_mqa(x); [k_nope, v] =
    kv_b_proj(norm(c_kv)). Keys are [k_nope, rope(k_rope)] with one RoPE key shared by all heads; queries
    [q_nope, rope(q_rope)]. Only c_kv and k_rope need caching at inference (the point of MLA); training
    materialises per-head k and v and runs the fused kernels.
    """

    LATENT_NORM_EPS = 1e-6  # HF builds q_a_layernorm / kv_a_layernorm with its default eps, not rms_norm_eps

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.n_heads = cfg.n_heads
        self.nope, self.rope, self.v_dim = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
        self.kv_lora_rank = cfg.kv_lora_rank
        self.q_lora_rank = cfg.q_lora_rank
        self.scale = (self.nope + self.rope) ** -0.5
        self.backend = cfg.attn_backend
        self._flash = load_flash_attn() if self.backend == "flash_attn" else None
        qk = cfg.n_heads * (self.nope + self.rope)
        if cfg.q_lora_rank is None:
            self.q_proj = nn.Linear(cfg.d_model, qk, bias=False)
        else:
            self.q_a_proj = nn.Linear(cfg.d_model, cfg.q_lora_rank, bias=False)
            self.q_a_layernorm = RMSNorm(cfg.q_lora_rank, self.LATENT_NORM_EPS)
            self.q_b_proj = nn.Linear(cfg.q_lora_rank, qk, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(cfg.d_model, cfg.kv_lora_rank + self.rope, bias=False)
        self.kv_a_layernorm = RMSNorm(cfg.kv_lora_rank, self.LATENT_NORM_EPS)
        self.kv_b_proj = nn.Linear(cfg.kv_lora_rank, cfg.n_heads * (self.nope + self.v_dim), bias=False)
        self.o_proj = nn.Linear(cfg.n_heads * self.v_dim, cfg.d_model, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """x (B, T, d_model), cos/sin (T, qk_rope_head_dim) -> (B, T, d_model)."""
        B, T, _ = x.shape
        H = self.n_heads
        q = self.q_proj(x) if self.q_lora_rank is None else self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        q = q.view(B, T, H, self.nope + self.rope).transpose(1, 2)  # (B, H, T, nope+rope)
        q_nope, q_rope = q.split([self.nope, self.rope], dim=-1)
        c_kv, k_rope = self.kv_a_proj_with_mqa(x).split([self.kv_lora_rank, self.rope], dim=-1)
        kv = self.kv_b_proj(self.kv_a_layernorm(c_kv)).view(B, T, H, self.nope + self.v_dim).transpose(1, 2)
        k_nope, v = kv.split([self.nope, self.v_dim], dim=-1)  # (B, H, T, nope), (B, H, T, v)
        k_rope = apply_rotary(k_rope.unsqueeze(1), cos, sin)  # (B, 1, T, rope), shared by all heads
        q = torch.cat((q_nope, apply_rotary(q_rope, cos, sin)), dim=-1)
        k = torch.cat((k_nope, k_rope.expand(B, H, T, self.rope)), dim=-1)
        y = _attend(self.backend, self._flash, q, k, v, self.scale)  # (B, H, T, v)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, H * self.v_dim))
