"""Llama-style dense decoder whose parameter names map 1:1 onto Hugging Face `LlamaForCausalLM`."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from model.attention import Attention
from model.config import ModelConfig
from model.rope import RotaryEmbedding


class RMSNorm(nn.Module):
    """x / rms(x) * weight, normalised in fp32 then cast back before the weight (as HF LlamaRMSNorm)."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


class MLP(nn.Module):
    """SwiGLU feed-forward: down(silu(gate(x)) * up(x)), no biases."""

    def __init__(self, d_model: int, hidden: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(d_model, hidden, bias=False)
        self.up_proj = nn.Linear(d_model, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    """Pre-norm decoder layer: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mlp = MLP(cfg.d_model, cfg.ffn_hidden)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin)
        return x + self.mlp(self.post_attention_layernorm(x))


class Transformer(nn.Module):
    """Decoder-only language model. HF names: prefix `model.` to everything except `lm_head`."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        if cfg.vocab_size <= 0:
            raise ValueError(
                f"model.vocab_size={cfg.vocab_size}: set it (e.g. from the tokenizer) before building the model"
            )
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.rotary_emb = RotaryEmbedding(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta)
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """Re-draw all weights from torch's global RNG: N(0, init_std), residual outputs scaled, norms at 1."""
        std = self.cfg.init_std
        # o_proj and down_proj write into the residual stream 2 * n_layers times; scale them so its variance at
        # init does not grow with depth (GPT-2 / OLMo).
        out_std = std / math.sqrt(2 * self.cfg.n_layers)
        for name, module in self.named_modules():
            if name == "lm_head" and self.cfg.tie_embeddings:
                continue  # same tensor as embed_tokens, drawn once
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, mean=0.0, std=out_std if name.endswith(("o_proj", "down_proj")) else std)
            elif isinstance(module, RMSNorm):
                nn.init.ones_(module.weight)

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids (B, T) -> logits (B, T, V); with labels (B, T), already shifted so labels[:, t] is the
        target of position t, the fp32 mean cross-entropy over positions where labels != -100 instead."""
        T = input_ids.size(1)
        cos, sin = self.rotary_emb(T)  # (T, hd) each
        x = self.embed_tokens(input_ids)  # (B, T, d)
        for layer in self.layers:
            x = layer(x, cos, sin)
        logits = self.lm_head(self.norm(x))  # (B, T, V)
        if labels is None:
            return logits
        return F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=-100)


def num_params(model: nn.Module, exclude_embeddings: bool = False) -> int:
    """Distinct parameters (tied ones once); exclude_embeddings drops embed_tokens and lm_head (Kaplan's N)."""
    skip: set[int] = set()
    if exclude_embeddings:
        skip = {id(model.embed_tokens.weight), id(model.lm_head.weight)}
    seen = {id(p): p for p in model.parameters()}  # parameters() already de-duplicates; be explicit
    return sum(p.numel() for i, p in seen.items() if i not in skip)
