"""Decoder-only LM: Llama-style dense (names 1:1 with HF `LlamaForCausalLM`) or DeepSeek-V3-style (MLA, DeepSeekMoE,
multi-token prediction; names 1:1 with HF `DeepseekV3ForCausalLM` except the training-only `mtp.*` modules)."""

from __future__ import annotations

import math

import torch
from torch import nn

from model.attention import Attention, MLAttention
from model.checkpointing import run_block
from model.config import ModelConfig
from model.kernels import use_kernels
from model.loss import LMHead
from model.masking import AttnMask, build_attn_mask, document_ids, document_positions
from model.moe import MLP, Experts, MoE, Router
from model.norm import RMSNorm
from model.rope import RotaryEmbedding

__all__ = ["MLP", "Block", "RMSNorm", "Transformer", "num_params"]


class Block(nn.Module):
    """Pre-norm decoder layer: x + attn(norm(x)), then x + mlp(norm(x)); mlp is MoE from moe.first_k_dense on."""

    def __init__(self, cfg: ModelConfig, layer_idx: int = 0) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.self_attn = MLAttention(cfg) if cfg.attention == "mla" else Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mlp = MoE(cfg.d_model, cfg.moe) if cfg.is_moe_layer(layer_idx) else MLP(cfg.d_model, cfg.ffn_hidden)
        self.activation_checkpointing = cfg.activation_checkpointing

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: AttnMask | None = None
    ) -> torch.Tensor:
        # Checkpointing inside forward, so `block.compile()` compiles the checkpointed region (torchtitan's order).
        mode = self.activation_checkpointing if self.training else "none"
        return run_block(self._forward, mode, x, cos, sin, mask)

    def _forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: AttnMask | None = None
    ) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask)
        return x + self.mlp(self.post_attention_layernorm(x))


class MTPModule(nn.Module):
    """One DeepSeek-V3 multi-token-prediction depth: block(eh_proj([hnorm(h_{i}); enorm(emb(t_{i+k}))])).

    The embedding and the output head are the main model's; `norm` is this depth's own final norm.
    """

    def __init__(self, cfg: ModelConfig, layer_idx: int) -> None:
        super().__init__()
        self.hnorm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.enorm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.eh_proj = nn.Linear(2 * cfg.d_model, cfg.d_model, bias=False)
        self.block = Block(cfg, layer_idx)
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)

    def forward(
        self, h: torch.Tensor, emb: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: AttnMask | None = None
    ) -> torch.Tensor:
        """h, emb (B, T', d) -> next hidden states (B, T', d)."""
        return self.block(self.eh_proj(torch.cat((self.hnorm(h), self.enorm(emb)), dim=-1)), cos, sin, mask)


class Transformer(nn.Module):
    """Decoder-only language model. HF names: prefix `model.` to everything except `lm_head` (and `mtp`)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        if cfg.vocab_size <= 0:
            raise ValueError(
                f"model.vocab_size={cfg.vocab_size}: set it (e.g. from the tokenizer) before building the model"
            )
        if cfg.doc_masking and not 0 <= cfg.eos_id < cfg.vocab_size:
            raise ValueError(
                f"model.doc_masking=true needs model.eos_id, the document separator, in [0, {cfg.vocab_size}); got "
                f"{cfg.eos_id}: set it, or build through train.pretrain which takes it from the tokenizer"
            )
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.lm_head = LMHead(cfg.d_model, cfg.vocab_size, cfg.loss_impl, cfg.loss_chunk_size)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        if cfg.mtp.depth:
            self.mtp = nn.ModuleList(MTPModule(cfg, cfg.n_layers + k) for k in range(cfg.mtp.depth))
        self.rotary_emb = RotaryEmbedding(cfg.rope_dim, cfg.max_seq_len, cfg.rope_theta)
        self.mtp_weight = cfg.mtp.loss_weight
        """lambda of the MTP loss; the trainer sets it from `cfg.mtp.weight_at(progress)` before each step."""
        self.last_stats: dict[str, torch.Tensor] = {}
        """Detached statistics of the last forward with labels (MoE / MTP models only): ce_loss, aux_loss,
        mtp_loss, moe_loads (n_moe_layers, E) routed-token counts."""
        self.init_weights()
        use_kernels(self, cfg.kernels)

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
            elif isinstance(module, Experts):
                nn.init.normal_(module.gate_up_proj, mean=0.0, std=std)
                nn.init.normal_(module.down_proj, mean=0.0, std=out_std)
            elif isinstance(module, Router):
                nn.init.normal_(module.weight, mean=0.0, std=std)
                module.e_score_correction_bias.zero_()

    def moe_layers(self) -> list[MoE]:
        """MoE modules in a fixed order (decoder layers, then MTP blocks): the rows of `moe_loads`."""
        return [m for m in self.modules() if isinstance(m, MoE)]

    @torch.no_grad()
    def update_balance(self, loads: torch.Tensor, gamma: float) -> None:
        """Move every MoE layer's selection bias toward balance; loads (n_moe_layers, E) must be identical on every
        data-parallel rank (all-reduced) so the biases stay identical."""
        for moe, load in zip(self.moe_layers(), loads, strict=True):
            moe.gate.update_bias(load, gamma)

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids (B, T) -> logits (B, T, V); with labels (B, T), already shifted so labels[:, t] is the
        target of position t, the fp32 mean cross-entropy over positions where labels != -100 instead.

        MoE / MTP models in training mode return the total loss: CE + balance loss (alpha already applied) +
        mtp_weight * mean MTP loss; `last_stats` holds the parts."""
        T = input_ids.size(1)
        doc_ids = document_ids(input_ids, self.cfg.eos_id) if self.cfg.doc_masking else None  # (B, T)
        if self.cfg.doc_position_reset:
            cos, sin = self.rotary_emb.at(document_positions(doc_ids))  # (B, 1, T, rope_dim) each
        else:
            cos, sin = self.rotary_emb(T)  # (T, rope_dim) each
        # Built once here, shared by every layer (flash_attn's boundaries cost one host sync).
        mask = build_attn_mask(self.cfg.attn_backend, doc_ids, T, input_ids.device)
        x = self.embed_tokens(input_ids)  # (B, T, d)
        for layer in self.layers:
            x = layer(x, cos, sin, mask)
        if labels is None:
            return self.lm_head(self.norm(x))  # (B, T, V) logits
        # model.loss_impl decides whether the (B, T, V) logits ever exist (torch) or not (chunked, liger).
        loss = self.lm_head(self.norm(x), labels)
        if not (self.training and (self.cfg.moe.enabled or self.cfg.mtp.depth)):
            return loss  # the dense Llama path, unchanged; evaluation is next-token CE only
        stats = {"ce_loss": loss.detach()}
        total = loss
        if self.cfg.mtp.depth:
            mtp_losses = []
            h = x
            for k, module in enumerate(self.mtp, start=1):
                # Depth k at position i combines h_i with the embedding of token i+k and predicts token i+k+1.
                # Position i keeps its own document (and RoPE position) whatever document token i+k is in.
                mask_k = build_attn_mask(
                    self.cfg.attn_backend, None if doc_ids is None else doc_ids[:, : T - k], T - k, input_ids.device
                )
                emb = self.embed_tokens(input_ids[:, k:])
                h = module(h[:, :-1], emb, cos[..., : T - k, :], sin[..., : T - k, :], mask_k)
                mtp_losses.append(self.lm_head(module.norm(h), labels[:, k:]))  # same loss path as the main head
            mtp_loss = torch.stack(mtp_losses).mean()
            total = total + self.mtp_weight * mtp_loss
            stats["mtp_loss"] = mtp_loss.detach()
        moes = self.moe_layers()
        if moes:
            stats["moe_loads"] = torch.stack([m.last_load for m in moes])
            auxes = [m.last_aux for m in moes if m.last_aux is not None]
            if auxes:
                aux = self.cfg.moe.seq_alpha * torch.stack(auxes).sum()
                total = total + aux
                stats["aux_loss"] = aux.detach()
            for m in moes:
                m.last_aux = None
        self.last_stats = stats
        return total


def num_params(model: nn.Module, exclude_embeddings: bool = False) -> int:
    """Distinct parameters (tied ones once); exclude_embeddings drops embed_tokens and lm_head (Kaplan's N)."""
    skip: set[int] = set()
    if exclude_embeddings:
        skip = {id(model.embed_tokens.weight), id(model.lm_head.weight)}
    seen = {id(p): p for p in model.parameters()}  # parameters() already de-duplicates; be explicit
    return sum(p.numel() for i, p in seen.items() if i not in skip)
