"""Decoder-only LM: Llama-style dense (names 1:1 with HF `LlamaForCausalLM`) or DeepSeek-V3-style (MLA, DeepSeekMoE,
multi-token prediction; names 1:1 with HF `DeepseekV3ForCausalLM` except the training-only `mtp.*` modules)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import nn

from model.attention import Attention, MLAttention
from model.checkpointing import run_block
from model.config import ExecutionConfig, ModelConfig, check_execution
from model.kernels import use_kernels
from model.loss import LMHead
from model.masking import AttnMask, build_attn_mask, document_ids, document_positions
from model.moe import MLP, ExpertDispatcher, Experts, MoE, Router
from model.norm import RMSNorm
from model.output import ModelOutput
from model.rope import RotaryEmbedding

__all__ = ["MLP", "Block", "Context", "ModelOutput", "RMSNorm", "SequenceShard", "Transformer", "num_params"]

IGNORE = -100


@dataclass(frozen=True)
class SequenceShard:
    """This rank's part of every sequence under sequence parallelism (injected by train/, like the expert
    dispatcher): positions [rank * T / size, (rank + 1) * T / size). The model still receives whole sequences, so
    document boundaries, positions and the loss's token count come from the global sequence; the attention module's
    `attention` is wrapped (by train/) to see the whole sequence for a share of the heads."""

    size: int = 1
    rank: int = 0

    def bounds(self, T: int) -> tuple[int, int]:
        n = T // self.size
        return self.rank * n, (self.rank + 1) * n


class Context(NamedTuple):
    """Per-sequence inputs of every layer (`Transformer.context`)."""

    doc_ids: torch.Tensor | None
    cos: torch.Tensor
    sin: torch.Tensor
    mask: AttnMask | None


BlockOutput = tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]
"""Hidden states (B, T, d), then the MoE layer's expert load (E,) and balance loss (scalar), None where absent."""


class Block(nn.Module):
    """Pre-norm decoder layer: x + attn(norm(x)), then x + mlp(norm(x)); mlp is MoE from moe.first_k_dense on."""

    def __init__(
        self,
        cfg: ModelConfig,
        layer_idx: int = 0,
        dispatcher: ExpertDispatcher | None = None,
        execution: ExecutionConfig | None = None,
    ) -> None:
        super().__init__()
        execution = execution or ExecutionConfig()
        self.input_layernorm = RMSNorm(cfg.d_model, cfg.norm_eps)
        attn = MLAttention if cfg.attention == "mla" else Attention
        self.self_attn = attn(cfg, execution.attn_backend)
        self.post_attention_layernorm = RMSNorm(cfg.d_model, cfg.norm_eps)
        if cfg.is_moe_layer(layer_idx):
            self.mlp = MoE(cfg.d_model, cfg.moe, dispatcher, execution.expert_impl)
        else:
            self.mlp = MLP(cfg.d_model, cfg.ffn_hidden)
        self.activation_checkpointing = execution.activation_checkpointing

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: AttnMask | None = None
    ) -> BlockOutput:
        """x (B, T, d) -> (x', load, aux): see `BlockOutput`."""
        # Checkpointing inside forward, so `block.compile()` compiles the checkpointed region (torchtitan's order).
        mode = self.activation_checkpointing if self.training else "none"
        return run_block(self._forward, mode, x, cos, sin, mask)

    def _forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: AttnMask | None = None
    ) -> BlockOutput:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask)
        if isinstance(self.mlp, MoE):
            y, load, aux = self.mlp(self.post_attention_layernorm(x))
            return x + y, load, aux
        return x + self.mlp(self.post_attention_layernorm(x)), None, None


class MTPModule(nn.Module):
    """One DeepSeek-V3 multi-token-prediction depth: block(eh_proj([hnorm(h_{i}); enorm(emb(t_{i+k}))])).

    The embedding and the output head are the main model's; `norm` is this depth's own final norm.
    """

    def __init__(
        self,
        cfg: ModelConfig,
        layer_idx: int,
        dispatcher: ExpertDispatcher | None = None,
        execution: ExecutionConfig | None = None,
    ) -> None:
        super().__init__()
        self.hnorm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.enorm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.eh_proj = nn.Linear(2 * cfg.d_model, cfg.d_model, bias=False)
        self.block = Block(cfg, layer_idx, dispatcher, execution)
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)

    def forward(
        self, h: torch.Tensor, emb: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: AttnMask | None = None
    ) -> BlockOutput:
        """h, emb (B, T', d) -> (next hidden states (B, T', d), load, aux) of the block: see `BlockOutput`."""
        return self.block(self.eh_proj(torch.cat((self.hnorm(h), self.enorm(emb)), dim=-1)), cos, sin, mask)


class BlockRunner:
    """Calls decoder and MTP blocks and keeps what their MoE layers report, in call order: routed-token loads and
    balance losses (the rows of `ModelOutput.expert_loads` / `aux_losses`)."""

    def __init__(self) -> None:
        self.loads: list[torch.Tensor] = []
        self.auxes: list[torch.Tensor] = []

    def __call__(self, block: nn.Module, *args: object) -> torch.Tensor:
        h, load, aux = block(*args)
        if load is not None:
            self.loads.append(load)
        if aux is not None:
            self.auxes.append(aux)
        return h


class Transformer(nn.Module):
    """Decoder-only language model. HF names: prefix `model.` to everything except `lm_head` (and `mtp`).

    `execution` picks the kernels, the loss implementation and activation checkpointing (default: the pure-PyTorch
    reference; compile and fp8 are applied by train.optimize). `dispatcher` (expert parallelism, injected by train/)
    alone decides expert sharding: every MoE layer holds only this rank's share of the routed experts; without one
    the model holds all experts (evaluation, export).
    """

    def __init__(
        self,
        cfg: ModelConfig,
        execution: ExecutionConfig | None = None,
        dispatcher: ExpertDispatcher | None = None,
        seq_shard: SequenceShard | None = None,
        random_init: bool = True,
    ) -> None:
        """random_init=False skips `init_weights` (weights about to be loaded, e.g. partitioned at construction)."""
        super().__init__()
        self.seq_shard = seq_shard or SequenceShard()
        if cfg.vocab_size <= 0:
            raise ValueError(
                f"model.vocab_size={cfg.vocab_size}: set it (e.g. from the tokenizer) before building the model"
            )
        execution = execution or ExecutionConfig()
        check_execution(cfg, execution)
        if cfg.doc_masking and not 0 <= cfg.eos_id < cfg.vocab_size:
            raise ValueError(
                f"model.doc_masking=true needs model.eos_id, the document separator, in [0, {cfg.vocab_size}); got "
                f"{cfg.eos_id}: set it, or build through train.pretrain which takes it from the tokenizer"
            )
        self.cfg, self.execution = cfg, execution
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.layers = nn.ModuleList(Block(cfg, i, dispatcher, execution) for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.lm_head = LMHead(cfg.d_model, cfg.vocab_size, execution.loss_impl, execution.loss_chunk_size)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        if cfg.mtp.depth:
            self.mtp = nn.ModuleList(
                MTPModule(cfg, cfg.n_layers + k, dispatcher, execution) for k in range(cfg.mtp.depth)
            )
        self.rotary_emb = RotaryEmbedding(cfg.rope_dim, cfg.max_seq_len, cfg.rope_theta)
        if random_init:
            self.init_weights()
        use_kernels(self, execution.kernels)

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
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, RMSNorm):
                nn.init.ones_(module.weight)
            elif isinstance(module, Experts):
                # Draw all E experts and keep this rank's slice: the same RNG stream, hence the same initial
                # model, whatever the expert-parallel degree.
                local = slice(module.expert_offset, module.expert_offset + module.n_local)
                for weight, s in ((module.gate_up_proj, std), (module.down_proj, out_std)):
                    full = weight.new_empty(module.n_experts, *weight.shape[1:]).normal_(mean=0.0, std=s)
                    weight.copy_(full[local])
            elif isinstance(module, Router):
                nn.init.normal_(module.weight, mean=0.0, std=std)
                module.e_score_correction_bias.zero_()

    def moe_layers(self) -> list[MoE]:
        """MoE modules in a fixed order (decoder layers, then MTP blocks): the rows of `expert_loads` and
        `aux_losses` in `ModelOutput`."""
        return [m for m in self.modules() if isinstance(m, MoE)]

    def context(self, input_ids: torch.Tensor) -> Context:
        """What every layer needs besides its input, from the whole sequences (B, T): document ids (or None), RoPE
        cos/sin and the attention mask. Pipeline stages recompute it from the token ids they receive."""
        T = input_ids.size(1)
        doc_ids = document_ids(input_ids, self.cfg.eos_id) if self.cfg.doc_masking else None  # (B, T)
        if self.cfg.doc_position_reset:
            cos, sin = self.rotary_emb.at(document_positions(doc_ids))  # (B, 1, T, rope_dim) each
        else:
            cos, sin = self.rotary_emb(T)  # (T, rope_dim) each
        # Built once here, shared by every layer (flash_attn's boundaries cost one host sync).
        mask = build_attn_mask(self.execution.attn_backend, doc_ids, T, input_ids.device)
        return Context(doc_ids, cos, sin, mask)

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None) -> ModelOutput:
        """input_ids (B, T) -> `ModelOutput`: logits (B, T, V); with labels (B, T), already shifted so labels[:, t]
        is the target of position t, ce_loss (the fp32 mean over labels != -100) instead, plus in training mode the
        MTP losses. MoE models also return expert loads, and in training mode the balance losses."""
        ctx = self.context(input_ids)
        if self.seq_shard.size > 1:  # sequence parallelism: this rank's positions; the mask stays global
            return self._forward_shard(input_ids, labels, *ctx)
        x = self.embed_tokens(input_ids)  # (B, T, d)
        run = BlockRunner()
        loads, auxes = run.loads, run.auxes
        for layer in self.layers:
            x = run(layer, x, ctx.cos, ctx.sin, ctx.mask)
        logits, ce_loss, mtp_losses = self.head(x, input_ids, labels, ctx, run)
        return ModelOutput(
            logits=logits,
            ce_loss=ce_loss,
            aux_losses=torch.stack(auxes) if auxes else None,
            mtp_losses=mtp_losses,
            expert_loads=torch.stack(loads) if loads else None,
        )

    def head(self, x: torch.Tensor, input_ids: torch.Tensor, labels: torch.Tensor | None, ctx: Context, run):
        """The last decoder layer's output x (B, T, d) -> (logits, ce_loss, mtp_losses) as in `ModelOutput`; `run`
        calls an MTP block and keeps its MoE load and balance loss."""
        if labels is None:
            return self.lm_head(self.norm(x)), None, None  # (B, T, V)
        mtp_losses = None
        T = input_ids.size(1)
        # execution.loss_impl decides whether the (B, T, V) logits ever exist (torch) or not (chunked, liger).
        ce_loss = self.lm_head(self.norm(x), labels)
        if self.training and self.cfg.mtp.depth:
            doc_ids, cos, sin = ctx.doc_ids, ctx.cos, ctx.sin
            losses = []
            h = x
            for k, module in enumerate(self.mtp, start=1):
                # Depth k at position i combines h_i with the embedding of token i+k and predicts token i+k+1.
                # Position i keeps its own document (and RoPE position) whatever document token i+k is in.
                mask_k = build_attn_mask(
                    self.execution.attn_backend,
                    None if doc_ids is None else doc_ids[:, : T - k],
                    T - k,
                    input_ids.device,
                )
                emb = self.embed_tokens(input_ids[:, k:])
                h = run(module, h[:, :-1], emb, cos[..., : T - k, :], sin[..., : T - k, :], mask_k)
                losses.append(self.lm_head(module.norm(h), labels[:, k:]))  # same loss path as the main head
            mtp_losses = torch.stack(losses)
        return None, ce_loss, mtp_losses

    def _forward_shard(self, input_ids, labels, doc_ids, cos, sin, mask) -> ModelOutput:
        """`forward` on this rank's shard of whole sequences (sequence parallelism).

        ce_loss (and each MTP loss) is this shard's share of the whole sequence's mean: summed CE / the sequence's
        token count, so the shares of a sequence's ranks add up to its mean. MTP depth k keeps the full length: its
        last k positions are padding with ignored labels, which causal attention keeps from every real position.
        """
        T = input_ids.size(1)
        s, e = self.seq_shard.bounds(T)
        cos, sin = cos[..., s:e, :], sin[..., s:e, :]
        x = self.embed_tokens(input_ids[:, s:e])  # (B, T / size, d)
        run = BlockRunner()
        loads, auxes = run.loads, run.auxes
        for layer in self.layers:
            x = run(layer, x, cos, sin, mask)
        logits = ce_loss = mtp_losses = None
        if labels is None:
            logits = self.lm_head(self.norm(x))  # (B, T / size, V): this shard's positions
        else:
            ce_loss = self.lm_head(self.norm(x), labels[:, s:e], (labels != IGNORE).sum())
            if self.training and self.cfg.mtp.depth:
                losses = []
                h = x
                for k, module in enumerate(self.mtp, start=1):
                    ids_k, labels_k = _pad_tail(input_ids, k, 0), _pad_tail(labels, k, IGNORE)
                    emb = self.embed_tokens(ids_k[:, s:e])
                    h = run(module, h, emb, cos, sin, mask)
                    losses.append(self.lm_head(module.norm(h), labels_k[:, s:e], (labels_k != IGNORE).sum()))
                mtp_losses = torch.stack(losses)
        return ModelOutput(
            logits=logits,
            ce_loss=ce_loss,
            aux_losses=torch.stack(auxes) if auxes else None,
            mtp_losses=mtp_losses,
            expert_loads=torch.stack(loads) if loads else None,
        )


def _pad_tail(t: torch.Tensor, k: int, value: int) -> torch.Tensor:
    """t (B, T) shifted left by k, the last k columns filled with `value` (same length T)."""
    return torch.cat((t[:, k:], t.new_full((t.size(0), k), value)), dim=1)


def num_params(model: nn.Module, exclude_embeddings: bool = False) -> int:
    """Distinct parameters (tied ones once); exclude_embeddings drops embed_tokens and lm_head (Kaplan's N)."""
    skip: set[int] = set()
    if exclude_embeddings:
        skip = {id(model.embed_tokens.weight), id(model.lm_head.weight)}
    seen = {id(p): p for p in model.parameters()}  # parameters() already de-duplicates; be explicit
    return sum(p.numel() for i, p in seen.items() if i not in skip)
