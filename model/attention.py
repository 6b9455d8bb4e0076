"""Causal self-attention, grouped-query (Llama) or multi-head latent (DeepSeek), over four interchangeable kernels
(sdpa, flash_attn, flex, eager), optionally restricted to the documents of a packed row (see model/masking.py)."""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from model.accelerator import compiles_flex
from model.config import ModelConfig
from model.masking import AttnMask
from model.norm import RMSNorm
from model.rope import apply_rotary, apply_rotary_qk

FLASH_ATTN_MISSING = (
    "execution.attn_backend=flash_attn requested but flash-attn is not installed: install it with "
    "`pip install -e .[flash]` on a CUDA machine, or set execution.attn_backend=sdpa"
)
FLEX_CPU_BACKWARD = (
    "execution.attn_backend=flex has no backward pass on CPU (torch runs FlexAttention unfused there, forward only): "
    "train on CUDA, or set execution.attn_backend=sdpa"
)


class FlashAttnUnavailableError(ImportError):
    """execution.attn_backend=flash_attn was asked for but the flash-attn package cannot be imported."""


def load_flash_attn() -> Callable[..., torch.Tensor]:
    """flash_attn.flash_attn_func, or FlashAttnUnavailableError with the install hint."""
    try:
        from flash_attn import flash_attn_func
    except ImportError as e:
        raise FlashAttnUnavailableError(FLASH_ATTN_MISSING) from e
    return flash_attn_func


def load_flash_attn_varlen() -> Callable[..., torch.Tensor]:
    """flash_attn.flash_attn_varlen_func (packed documents), or FlashAttnUnavailableError."""
    try:
        from flash_attn import flash_attn_varlen_func
    except ImportError as e:
        raise FlashAttnUnavailableError(FLASH_ATTN_MISSING) from e
    return flash_attn_varlen_func


def repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """(B, n_kv, T, hd) -> (B, n_kv * n_rep, T, hd), each kv head shared by n_rep consecutive query heads."""
    if n_rep == 1:
        return x
    B, n_kv, T, hd = x.shape
    return x[:, :, None].expand(B, n_kv, n_rep, T, hd).reshape(B, n_kv * n_rep, T, hd)


def eager_causal_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Reference softmax(q k^T * scale + mask) v; q (B, nh, T, dqk), k (B, n_kv, T, dqk), v (B, n_kv, T, dv).

    mask (B, 1, T, T) bool, True = may attend; None = causal. scale defaults to 1/sqrt(dqk)."""
    n_rep = q.size(1) // k.size(1)
    k, v = repeat_kv(k, n_rep), repeat_kv(v, n_rep)
    T = q.size(2)
    scores = (q @ k.transpose(-2, -1)) * (scale if scale is not None else 1.0 / math.sqrt(q.size(-1)))  # (B,nh,T,T)
    if mask is None:
        mask = torch.ones(T, T, dtype=torch.bool, device=q.device).tril()
    scores = scores.masked_fill(~mask, float("-inf"))
    # Softmax in fp32 as HF eager does, so bf16 runs of the reference stay a reference.
    probs = F.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    return probs @ v  # (B, nh, T, dv)


@functools.cache
def _compiled_flex_attention() -> Callable[..., torch.Tensor]:
    from torch.nn.attention.flex_attention import flex_attention

    # Uncompiled flex materialises the full score matrix; compiled it is a fused kernel that skips masked tiles.
    return torch.compile(flex_attention, dynamic=False)


def flex_attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_mask, scale: float) -> torch.Tensor:
    """FlexAttention of q (B, nh, T, dqk), k/v (B, n_kv, T, d) under block_mask -> (B, nh, T, dv)."""
    from torch.nn.attention.flex_attention import flex_attention

    compiled = compiles_flex(q.device)
    if not compiled and torch.is_grad_enabled() and q.requires_grad:
        raise NotImplementedError(FLEX_CPU_BACKWARD)
    fn = _compiled_flex_attention() if compiled else flex_attention
    return fn(q, k, v, block_mask=block_mask, scale=scale, enable_gqa=q.size(1) != k.size(1))


class FlashKernels:
    """flash-attn's dense and variable-length kernels, imported at build time so a missing package fails early."""

    def __init__(self) -> None:
        self.dense = load_flash_attn()
        self.varlen = load_flash_attn_varlen()


def attend(
    backend: str,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: float,
    mask: AttnMask | None = None,
    flash: FlashKernels | None = None,
) -> torch.Tensor:
    """Causal attention q (B, nh, T, dqk), k (B, n_kv, T, dqk), v (B, n_kv, T, dv) -> (B, nh, T, dv).

    n_kv divides nh (GQA); dv may differ from dqk (MLA). mask from `build_attn_mask` for `backend`: None is plain
    causal; otherwise attention also stays inside each document."""
    gqa = q.size(1) != k.size(1)
    if backend == "flex":
        return flex_attend(q, k, v, mask.block_mask, scale)
    if backend == "flash_attn":
        dqk, dv = q.size(-1), v.size(-1)
        if dv < dqk:  # flash-attn needs one head dim: pad v, slice the output back
            v = F.pad(v, (0, dqk - dv))
        # flash-attn wants (B, T, heads, hd) in fp16/bf16 (i.e. under autocast) and handles GQA natively.
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        if mask is None:
            y = flash.dense(q, k, v, causal=True, softmax_scale=scale)  # (B, T, nh, dqk)
        else:
            B, T = q.shape[:2]
            # Documents become the variable-length sequences of one flattened (B*T) batch.
            y = flash.varlen(
                q.reshape(B * T, *q.shape[2:]),
                k.reshape(B * T, *k.shape[2:]),
                v.reshape(B * T, *v.shape[2:]),
                mask.cu_seqlens,
                mask.cu_seqlens,
                mask.max_seqlen,
                mask.max_seqlen,
                causal=True,
                softmax_scale=scale,
            ).view(B, T, -1, dqk)
        return y.transpose(1, 2)[..., :dv]
    if backend == "sdpa":
        if mask is None:
            # enable_gqa broadcasts kv heads inside the kernel instead of materialising repeat_kv copies.
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=gqa)
        # An arbitrary mask rules out the flash kernel; explicit kv copies keep the memory-efficient one eligible
        # (enable_gqa has not always been supported there), rather than a fallback to the O(T^2)-memory math kernel.
        n_rep = q.size(1) // k.size(1)
        return F.scaled_dot_product_attention(q, repeat_kv(k, n_rep), repeat_kv(v, n_rep), mask.dense, scale=scale)
    return eager_causal_attention(q, k, v, scale, None if mask is None else mask.dense)


@torch.no_grad()
def max_attention_logits(
    q: torch.Tensor, k: torch.Tensor, scale: float, mask: AttnMask | None = None, chunk: int = 256
) -> torch.Tensor:
    """Largest pre-softmax logit q.k * scale of each query head over the batch and the (causal, and where `mask`
    has a dense form, document) pairs that attention lets through: q (B, nh, T, d), k (B, n_kv, T, d) -> (nh,) fp32.

    Computed apart from the attention kernel (which never materialises the logits), in query chunks of `chunk`."""
    B, H, T, _ = q.shape
    k = repeat_kv(k, H // k.size(1)).float()
    best = torch.full((H,), float("-inf"), device=q.device)
    pos = torch.arange(T, device=q.device)
    for s in range(0, T, chunk):
        e = min(T, s + chunk)
        scores = (q[:, :, s:e].float() @ k[:, :, :e].transpose(-2, -1)) * scale  # (B, H, e-s, e)
        allowed = pos[None, :e] <= pos[s:e, None]  # causal
        if mask is not None and mask.dense is not None:
            allowed = allowed & mask.dense[:, :, s:e, :e]
        scores = scores.masked_fill(~allowed, float("-inf"))
        best = torch.maximum(best, scores.amax(dim=(0, 2, 3)))
    return best


class LogitTracker:
    """Mixin of the attention modules: with `track_max_logit` set (by the trainer's QK-clip component), each forward
    folds the largest logit per head into `max_logit` (nh,), until the trainer reads and resets it. Off by default:
    the forward then runs exactly as without it."""

    track_max_logit: bool = False
    max_logit: torch.Tensor | None = None

    def _track(self, q: torch.Tensor, k: torch.Tensor, mask: AttnMask | None) -> None:
        m = max_attention_logits(q, k, self.scale, mask)
        self.max_logit = m if self.max_logit is None else torch.maximum(self.max_logit, m)


class Attention(LogitTracker, nn.Module):
    """Llama self-attention: q/k/v/o projections, RoPE on q and k, causal GQA. Options: q/k/v biases (Qwen2),
    per-head RMSNorm of q and k before RoPE (Qwen3, `q_norm` / `k_norm`)."""

    attention: Callable[..., torch.Tensor] = staticmethod(attend)
    """The kernel call `attend(backend, q, k, v, scale, mask, flash)`; sequence parallelism (train/) wraps it in
    Ulysses' all-to-all on an instance, the projections around it unchanged."""

    _liger = None
    """liger_kernel.transformers.functional when execution.kernels=liger (fused RoPE)."""

    def __init__(self, cfg: ModelConfig, backend: str = "sdpa") -> None:
        super().__init__()
        self.n_heads = cfg.n_heads
        self.n_kv_heads = cfg.n_kv_heads
        # Query heads per key head, fixed here: tensor parallelism (DeepSpeed AutoTP) rewrites `n_heads` of the
        # module to its slice's count, not `n_kv_heads`.
        self.q_per_kv = cfg.n_heads // cfg.n_kv_heads
        self.head_dim = cfg.head_dim
        self.scale = 1.0 / math.sqrt(cfg.head_dim)
        self.backend = backend
        # Fail at build time, not at the first forward of a long job.
        self._flash = FlashKernels() if self.backend == "flash_attn" else None
        self.q_proj = nn.Linear(cfg.d_model, cfg.n_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(cfg.d_model, cfg.n_kv_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(cfg.d_model, cfg.n_kv_heads * cfg.head_dim, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.d_model, bias=False)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(cfg.head_dim, cfg.norm_eps)
            self.k_norm = RMSNorm(cfg.head_dim, cfg.norm_eps)
        self.qk_norm = cfg.qk_norm

    def qk_clip_scales(self, gamma: torch.Tensor) -> list[tuple[nn.Parameter, torch.Tensor]]:
        """Row factors that multiply head h's logits by gamma[h] (nh,): with one key head per query head, sqrt(gamma)
        on both; with grouped keys (shared by several query heads), gamma on the query head alone, so heads under
        the threshold keep their weights."""
        gamma = gamma.float()
        hd = self.head_dim
        if self.q_per_kv == 1:
            root = gamma.sqrt().repeat_interleave(hd)
            return [(self.q_proj.weight, root), (self.k_proj.weight, root)]
        return [(self.q_proj.weight, gamma.repeat_interleave(hd))]

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: AttnMask | None = None
    ) -> torch.Tensor:
        """x (B, T, d_model), cos/sin (T, hd) or (B, 1, T, hd), mask from `build_attn_mask` -> (B, T, d_model)."""
        B, T, _ = x.shape
        # Head counts follow the projections' widths (-1): tensor parallelism gives a rank a slice of the heads.
        q = self.q_proj(x).view(B, T, -1, self.head_dim)
        k = self.k_proj(x).view(B, T, -1, self.head_dim)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q = q.transpose(1, 2)  # (B, nh, T, hd)
        k = k.transpose(1, 2)  # (B, n_kv, T, hd)
        v = self.v_proj(x).view(B, T, -1, self.head_dim).transpose(1, 2)  # (B, n_kv, T, hd)
        q, k = apply_rotary_qk(q, k, cos, sin, self._liger)
        if self.track_max_logit:
            self._track(q, k, mask)
        y = self.attention(self.backend, q, k, v, self.scale, mask, self._flash)  # (B, nh, T, hd)
        y = y.transpose(1, 2).reshape(B, T, -1)  # (B, T, nh*hd)
        return self.o_proj(y)


class MLAttention(LogitTracker, nn.Module):
    """Multi-head latent attention (DeepSeek-V2/V3), parameter names as HF `DeepseekV3Attention`.

    q = q_proj(x) or q_b_proj(norm(q_a_proj(x))); [c_kv, k_rope] = kv_a_proj_with_mqa(x); [k_nope, v] =
    kv_b_proj(norm(c_kv)). Keys are [k_nope, rope(k_rope)] with one RoPE key shared by all heads; queries
    [q_nope, rope(q_rope)]. Only c_kv and k_rope need caching at inference (the point of MLA); training
    materialises per-head k and v and runs the fused kernels.
    """

    attention: Callable[..., torch.Tensor] = staticmethod(attend)
    """As `Attention.attention`."""
    shared_key: Callable[[torch.Tensor], torch.Tensor] = staticmethod(lambda t: t)
    """Applied to the RoPE key shared by all heads. Identity; under tensor parallelism (train/) each rank's heads
    give only part of its gradient, so it becomes copy-to-tensor-parallel-region (gradient all-reduced)."""

    LATENT_NORM_EPS = 1e-6  # HF builds q_a_layernorm / kv_a_layernorm with its default eps, not rms_norm_eps

    def __init__(self, cfg: ModelConfig, backend: str = "sdpa") -> None:
        super().__init__()
        self.n_heads = cfg.n_heads
        self.nope, self.rope, self.v_dim = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
        self.kv_lora_rank = cfg.kv_lora_rank
        self.q_lora_rank = cfg.q_lora_rank
        self.scale = (self.nope + self.rope) ** -0.5
        self.backend = backend
        self._flash = FlashKernels() if self.backend == "flash_attn" else None
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

    def qk_clip_scales(self, gamma: torch.Tensor) -> list[tuple[nn.Parameter, torch.Tensor]]:
        """Row factors that multiply head h's logits by gamma[h] (nh,), as Kimi K2's MuonClip: the head's
        no-RoPE query and key rows by sqrt(gamma), its RoPE query rows by gamma; the RoPE key (kv_a_proj_with_mqa),
        shared by all heads, and the values are untouched."""
        gamma = gamma.float()
        root = gamma.sqrt()
        q_rows = torch.cat((root[:, None].expand(-1, self.nope), gamma[:, None].expand(-1, self.rope)), 1).reshape(-1)
        kv_rows = torch.cat((root[:, None].expand(-1, self.nope), torch.ones(len(gamma), self.v_dim)), 1).reshape(-1)
        q = self.q_proj.weight if self.q_lora_rank is None else self.q_b_proj.weight
        return [(q, q_rows), (self.kv_b_proj.weight, kv_rows)]

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: AttnMask | None = None
    ) -> torch.Tensor:
        """x (B, T, d_model), cos/sin (T, rope) or (B, 1, T, rope), mask from `build_attn_mask` -> (B, T, d_model)."""
        B, T, _ = x.shape
        q = self.q_proj(x) if self.q_lora_rank is None else self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        q = q.view(B, T, -1, self.nope + self.rope).transpose(1, 2)  # (B, H, T, nope+rope)
        H = q.size(1)  # this rank's heads: all of them, or a tensor-parallel slice
        q_nope, q_rope = q.split([self.nope, self.rope], dim=-1)
        c_kv, k_rope = self.kv_a_proj_with_mqa(x).split([self.kv_lora_rank, self.rope], dim=-1)
        kv = self.kv_b_proj(self.kv_a_layernorm(c_kv)).view(B, T, -1, self.nope + self.v_dim).transpose(1, 2)
        k_nope, v = kv.split([self.nope, self.v_dim], dim=-1)  # (B, H, T, nope), (B, H, T, v)
        k_rope = apply_rotary(self.shared_key(k_rope).unsqueeze(1), cos, sin)  # (B, 1, T, rope), shared by all heads
        q = torch.cat((q_nope, apply_rotary(q_rope, cos, sin)), dim=-1)
        k = torch.cat((k_nope, k_rope.expand(B, H, T, self.rope)), dim=-1)
        if self.track_max_logit:
            self._track(q, k, mask)
        y = self.attention(self.backend, q, k, v, self.scale, mask, self._flash)  # (B, H, T, v)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, H * self.v_dim))
