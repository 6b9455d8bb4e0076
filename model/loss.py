"""Output head + next-token cross-entropy, three ways: full logits (torch), chunked (pure PyTorch, the (N, V) logits
never exist at once) and Liger's fused Triton kernel (GPU only, optional)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from model.config import LOSS_IMPLS

IGNORE_INDEX = -100
LIGER_MISSING = (
    "execution.{key}=liger requested but liger-kernel is not importable: install it with `pip install liger-kernel` "
    "on a CUDA machine (it needs triton), or set execution.{key}=torch"
)


class LigerUnavailableError(ImportError):
    """execution.loss_impl=liger or execution.kernels=liger was asked for but liger_kernel cannot be imported."""


def load_liger(key: str):
    """The liger_kernel.transformers.functional module, or LigerUnavailableError naming the config key to change."""
    try:
        import liger_kernel.transformers.functional as lf
    except ImportError as e:
        raise LigerUnavailableError(LIGER_MISSING.format(key=key)) from e
    return lf


class ChunkedLinearCrossEntropy(torch.autograd.Function):
    """sum over rows of CE(hidden @ weight.T, labels) / n_valid, computed `chunk` rows at a time.

    Forward keeps only each row's fp32 log-sum-exp (N,); backward recomputes every chunk's logits and turns them
    into softmax - onehot, so peak extra memory is one (chunk, V) fp32 block instead of (N, V).
    """

    @staticmethod
    def forward(ctx, hidden, weight, labels, chunk: int, n_valid: torch.Tensor):
        """hidden (N, d), weight (V, d), labels (N,) with IGNORE_INDEX rows skipped -> scalar fp32 loss."""
        lse = torch.empty(hidden.size(0), dtype=torch.float32, device=hidden.device)
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for s in range(0, hidden.size(0), chunk):
            logits = (hidden[s : s + chunk] @ weight.t()).float()  # (c, V)
            y = labels[s : s + chunk]
            valid = y != IGNORE_INDEX
            lse[s : s + chunk] = torch.logsumexp(logits, dim=-1)
            target = logits.gather(1, y.clamp_min(0)[:, None]).squeeze(1)
            total += ((lse[s : s + chunk] - target) * valid).sum()
        ctx.save_for_backward(hidden, weight, labels, lse, n_valid)
        ctx.chunk = chunk
        return total / n_valid

    @staticmethod
    def backward(ctx, grad_out):
        hidden, weight, labels, lse, n_valid = ctx.saved_tensors
        scale = grad_out / n_valid
        grad_h = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        grad_w = None
        if ctx.needs_input_grad[1]:  # accumulated over chunks in fp32 whatever the weight dtype
            grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
        for s in range(0, hidden.size(0), ctx.chunk):
            h = hidden[s : s + ctx.chunk]
            y = labels[s : s + ctx.chunk]
            valid = y != IGNORE_INDEX
            p = ((h @ weight.t()).float() - lse[s : s + ctx.chunk, None]).exp_()  # softmax (c, V)
            p[torch.arange(y.size(0), device=y.device), y.clamp_min(0)] -= 1.0
            p *= (valid * scale)[:, None]  # dCE/dlogits, zero on ignored rows
            if grad_h is not None:
                grad_h[s : s + ctx.chunk] = (p.to(hidden.dtype) @ weight).to(grad_h.dtype)
            if grad_w is not None:
                grad_w += p.t() @ h.float()
        return grad_h, None if grad_w is None else grad_w.to(weight.dtype), None, None, None


def chunked_cross_entropy(
    hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, chunk: int, n_valid: torch.Tensor | None = None
) -> torch.Tensor:
    """Mean CE of hidden (N, d) @ weight (V, d).T against labels (N,) (IGNORE_INDEX skipped), chunk rows at a time;
    summed CE / n_valid when n_valid is given."""
    if torch.is_autocast_enabled(hidden.device.type):
        # The Function runs outside autocast; cast here (differentiably) as autocast would cast F.linear's inputs.
        dtype = torch.get_autocast_dtype(hidden.device.type)
        hidden, weight = hidden.to(dtype), weight.to(dtype)
    n_valid = ((labels != IGNORE_INDEX).sum() if n_valid is None else n_valid.clamp_min(1)).float()
    with torch.autocast(hidden.device.type, enabled=False):
        return ChunkedLinearCrossEntropy.apply(hidden, weight, labels, chunk, n_valid)


class LMHead(nn.Linear):
    """The output projection; called with labels it returns the mean next-token CE instead of logits.

    The loss goes through the module call so that hooks on the head (ZeRO-3 parameter gathering) fire for every
    implementation, including the ones that never build the logits.
    """

    def __init__(self, d_model: int, vocab_size: int, impl: str = "torch", chunk_size: int = 4096) -> None:
        super().__init__(d_model, vocab_size, bias=False)
        if impl not in LOSS_IMPLS:
            raise ValueError(f"execution.loss_impl={impl!r}: choose one of {LOSS_IMPLS}")
        self.impl, self.chunk_size = impl, chunk_size
        self._liger = load_liger("loss_impl") if impl == "liger" else None

    def forward(
        self, x: torch.Tensor, labels: torch.Tensor | None = None, n_valid: torch.Tensor | None = None
    ) -> torch.Tensor:
        """x (B, T, d) -> logits (B, T, V); with labels (B, T), the fp32 mean CE over labels != -100 instead.

        n_valid: divide the summed CE by this count instead of this call's own (a shard of a longer sequence)."""
        if labels is None:
            return F.linear(x, self.weight)
        if self.impl == "torch":
            logits = F.linear(x, self.weight)
            reduction = "mean" if n_valid is None else "sum"
            ce = F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=IGNORE_INDEX,
                                 reduction=reduction)  # fmt: skip
            return ce if n_valid is None else ce / n_valid.clamp_min(1)
        h, y = x.flatten(0, 1), labels.flatten()
        if self.impl == "chunked":
            return chunked_cross_entropy(h, self.weight, y, self.chunk_size, n_valid)
        w = self.weight
        if torch.is_autocast_enabled(h.device.type):  # Liger's Triton kernels run outside autocast
            dtype = torch.get_autocast_dtype(h.device.type)
            h, w = h.to(dtype), w.to(dtype)
        with torch.autocast(h.device.type, enabled=False):
            try:  # fp32 weight-gradient accumulation across chunks (liger-kernel >= 0.6)
                loss = self._liger.liger_fused_linear_cross_entropy(
                    h, w, y, ignore_index=IGNORE_INDEX, accum_dtype=torch.float32
                )
            except TypeError:
                loss = self._liger.liger_fused_linear_cross_entropy(h, w, y, ignore_index=IGNORE_INDEX)
        loss = loss.float()
        if n_valid is not None:  # this shard's mean -> its share of the whole sequence's (0 when all ignored)
            own = (y != IGNORE_INDEX).sum()
            loss = torch.where(own > 0, loss * own / n_valid.clamp_min(1), torch.zeros_like(loss))
        return loss
