"""Document masking of packed sequences: document ids from eos tokens, and the mask in each attention backend's form.

A packed row is documents joined by eos tokens; a position right after an eos starts a new document, the eos itself
ends the one before. With doc masking a query attends to keys that are at or before it *and* in its own document.
The mask is built once per forward (`build_attn_mask`) and shared by every layer.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from model.accelerator import compiles_flex


def document_ids(input_ids: torch.Tensor, eos_id: int) -> torch.Tensor:
    """input_ids (B, T) -> (B, T) int64 document index per row: the number of eos tokens strictly before t."""
    is_eos = (input_ids == eos_id).long()
    return is_eos.cumsum(dim=1) - is_eos  # exclusive cumsum: the eos belongs to the document it ends


def document_positions(doc_ids: torch.Tensor) -> torch.Tensor:
    """doc_ids (B, T) -> (B, T) int64 position of each token inside its document (0 at every document start)."""
    B, T = doc_ids.shape
    t = torch.arange(T, device=doc_ids.device).expand(B, T)
    starts = torch.ones_like(doc_ids, dtype=torch.bool)
    starts[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
    first = torch.where(starts, t, torch.zeros_like(t)).cummax(dim=1).values  # start index of t's document
    return t - first


@dataclass
class AttnMask:
    """Causal, document-restricted attention in the form one backend consumes; fields of other backends stay None."""

    dense: torch.Tensor | None = None
    """eager / sdpa: (B, 1, T, T) bool, True where query t may attend to key s."""
    block_mask: object | None = None
    """flex: a torch.nn.attention.flex_attention.BlockMask."""
    cu_seqlens: torch.Tensor | None = None
    """flash_attn: (n_docs + 1,) int32 document boundaries over the B*T flattened tokens (every row starts one)."""
    max_seqlen: int = 0
    """flash_attn: longest document, in tokens."""


def dense_doc_mask(doc_ids: torch.Tensor) -> torch.Tensor:
    """doc_ids (B, T) -> (B, 1, T, T) bool: causal and same document."""
    T = doc_ids.size(1)
    causal = torch.ones(T, T, dtype=torch.bool, device=doc_ids.device).tril()
    return (doc_ids[:, :, None] == doc_ids[:, None, :]) & causal  # (B, T, T)


def flash_varlen_boundaries(doc_ids: torch.Tensor) -> tuple[torch.Tensor, int]:
    """doc_ids (B, T) -> (cu_seqlens int32 (n_docs + 1,), max_seqlen) of the B*T flattened tokens."""
    B, T = doc_ids.shape
    starts = torch.ones_like(doc_ids, dtype=torch.bool)
    starts[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]  # column 0 is a start: documents never span rows
    idx = starts.flatten().nonzero().squeeze(1)
    cu = torch.cat((idx, idx.new_tensor([B * T]))).to(torch.int32)
    # One host sync per forward (not per layer): flash-attn takes max_seqlen as a Python int.
    return cu, int((cu[1:] - cu[:-1]).max().item())


def _flex_block_mask(mask_mod, B: int | None, T: int, device: torch.device):
    from torch.nn.attention.flex_attention import create_block_mask

    # Compiled on CUDA so the (B, T, T) mask never materialises; CPU (tests) builds it eagerly.
    return create_block_mask(mask_mod, B, None, T, T, device=device, _compile=compiles_flex(device))


@functools.lru_cache(maxsize=8)
def _causal_block_mask(T: int, device: torch.device):
    def causal(b, h, q, kv):
        return q >= kv

    return _flex_block_mask(causal, None, T, device)


def flex_doc_block_mask(doc_ids: torch.Tensor):
    """doc_ids (B, T) -> flex BlockMask of causal, same-document attention (fully masked tiles are skipped)."""

    def doc_causal(b, h, q, kv):
        return (q >= kv) & (doc_ids[b, q] == doc_ids[b, kv])

    return _flex_block_mask(doc_causal, doc_ids.size(0), doc_ids.size(1), doc_ids.device)


def build_attn_mask(backend: str, doc_ids: torch.Tensor | None, T: int, device: torch.device) -> AttnMask | None:
    """The mask `backend` needs for T positions; None means plain causal attention (the backend's own fast path).

    doc_ids (B, T) or None (no doc masking). flex always gets a BlockMask (causal ones are cached per length)."""
    if backend == "flex":
        return AttnMask(block_mask=_causal_block_mask(T, device) if doc_ids is None else flex_doc_block_mask(doc_ids))
    if doc_ids is None:
        return None
    if backend == "flash_attn":
        cu, max_len = flash_varlen_boundaries(doc_ids)
        return AttnMask(cu_seqlens=cu, max_seqlen=max_len)
    return AttnMask(dense=dense_doc_mask(doc_ids).unsqueeze(1))
