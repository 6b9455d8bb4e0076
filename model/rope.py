"""Rotary position embedding, numerically the same as Hugging Face Llama (non-interleaved halves)."""

from __future__ import annotations

import torch
from torch import nn


class RotaryEmbedding(nn.Module):
    """cos/sin tables for positions [0, max_seq_len), kept in fp32 whatever the model dtype."""

    def __init__(self, head_dim: int, max_seq_len: int, theta: float) -> None:
        super().__init__()
        self.head_dim = head_dim
        self.max_seq_len = max_seq_len
        self.theta = theta
        # Non-persistent: derived from the config, so never in a checkpoint or an HF export.
        self.register_buffer("cos", torch.empty(0), persistent=False)
        self.register_buffer("sin", torch.empty(0), persistent=False)
        self._build(None)

    def _build(self, device: torch.device | None) -> None:
        # device=None follows the default device, so `with torch.device(...)` (meta, a GPU) builds the tables there.
        # Same expression and op order as HF `compute_default_rope_parameters` + `LlamaRotaryEmbedding.forward`.
        inv_freq = 1.0 / (
            self.theta ** (torch.arange(0, self.head_dim, 2, dtype=torch.float, device=device) / self.head_dim)
        )
        pos = torch.arange(self.max_seq_len, dtype=torch.float, device=device)
        freqs = pos[:, None] * inv_freq[None, :]  # (max_T, hd/2)
        emb = torch.cat((freqs, freqs), dim=-1)  # (max_T, hd)
        self.cos = emb.cos()
        self.sin = emb.sin()

    def _apply(self, fn, recurse: bool = True):
        # `model.to(bf16)` would round the tables and `to_empty()` (meta-device init) would leave them garbage:
        # let the move happen, then rebuild in fp32 on whatever device the buffers landed on.
        super()._apply(fn, recurse)
        self._build(self.cos.device)
        return self

    def forward(self, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos, sin) for positions [0, seq_len), each (seq_len, head_dim) fp32."""
        if seq_len > self.max_seq_len:
            raise ValueError(f"sequence length {seq_len} exceeds model.max_seq_len={self.max_seq_len}")
        return self.cos[:seq_len], self.sin[:seq_len]

    def at(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos, sin) at positions (B, T), each (B, 1, T, head_dim) fp32 (broadcast over heads)."""
        if positions.size(1) > self.max_seq_len:
            raise ValueError(f"sequence length {positions.size(1)} exceeds model.max_seq_len={self.max_seq_len}")
        return self.cos[positions].unsqueeze(1), self.sin[positions].unsqueeze(1)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """(x1, x2) -> (-x2, x1) over the last dim split in halves (HF Llama layout, not interleaved pairs)."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x (B, n_heads, T, hd) by cos/sin (T, hd) or (B, 1, T, hd); computed in fp32, returned in x's dtype."""
    xf = x.float()
    return (xf * cos + rotate_half(xf) * sin).to(x.dtype)


def apply_rotary_qk(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, liger=None):
    """apply_rotary to q (B, nh, T, hd) and k (B, n_kv, T, hd); through Liger's fused RoPE kernel when `liger`
    (liger_kernel.transformers.functional) is given."""
    if liger is not None:
        return liger.liger_rope(q, k, cos[None], sin[None])
    return apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
