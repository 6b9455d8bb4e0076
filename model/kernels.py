"""Fused Liger kernels for RMSNorm, SwiGLU and RoPE, switched on per module after the model is built.

`use_kernels(model, "liger")` hands each RMSNorm, SwiGLU MLP, routed-expert group and GQA attention the liger_kernel
functional module; their forwards then call the Triton kernels instead of the pure-PyTorch reference (which stays
the fallback, and the only path on CPU). Parameters, names and state dicts are unchanged.
"""

from __future__ import annotations

from torch import nn

from model.attention import Attention
from model.config import KERNELS
from model.loss import load_liger
from model.moe import MLP, Experts
from model.norm import RMSNorm


def use_kernels(model: nn.Module, kernels: str) -> nn.Module:
    """Switch every RMSNorm, MLP, Experts and Attention in model to `kernels` (torch | liger); returns model."""
    if kernels not in KERNELS:
        raise ValueError(f"execution.kernels={kernels!r}: choose one of {KERNELS}")
    lf = load_liger("kernels") if kernels == "liger" else None
    for module in model.modules():
        if isinstance(module, (RMSNorm, MLP, Experts, Attention)):
            module._liger = lf
    return model
