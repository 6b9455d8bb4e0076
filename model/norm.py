"""RMSNorm, shared by the decoder blocks and MLA's latent norms."""

from __future__ import annotations

import torch
from torch import nn


class RMSNorm(nn.Module):
    """x / rms(x) * weight, normalised in fp32 then cast back before the weight (as HF LlamaRMSNorm)."""

    _liger = None
    """liger_kernel.transformers.functional when execution.kernels=liger (set by model.kernels.use_kernels)."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._liger is not None:
            # casting_mode="llama": the same fp32 normalisation and cast-back-before-weight order as below.
            w = self.weight.to(x.dtype)
            return self._liger.liger_rms_norm(x, w, self.eps, casting_mode="llama", in_place=False)
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)
