"""DeepSeekMoE: sigmoid top-k router with an auxiliary-loss-free balancing bias, grouped experts, shared experts.

Parameter and buffer names follow Hugging Face `DeepseekV3MoE` (`gate.weight`, `gate.e_score_correction_bias`,
`experts.gate_up_proj`, `experts.down_proj`, `shared_experts.*`), so export is a rename of the prefix only.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from model.config import MoEConfig


class Router(nn.Module):
    """Sigmoid affinities; the balancing bias steers which experts are chosen but never the gate values."""

    def __init__(self, d_model: int, cfg: MoEConfig) -> None:
        super().__init__()
        self.n_experts, self.top_k = cfg.n_routed_experts, cfg.top_k
        self.n_group, self.topk_group = cfg.n_group, cfg.topk_group
        self.route_scale = cfg.route_scale
        self.weight = nn.Parameter(torch.empty(cfg.n_routed_experts, d_model))
        # Persistent: saved in checkpoints and exported as HF's e_score_correction_bias. Always fp32 (see _apply).
        self.register_buffer("e_score_correction_bias", torch.zeros(cfg.n_routed_experts))

    def _apply(self, fn, recurse: bool = True):
        # `model.to(bf16)` (DeepSpeed bf16) would round the bias so that gamma=1e-3 steps vanish; keep it fp32.
        super()._apply(fn, recurse)
        if self.e_score_correction_bias.is_floating_point():
            self.e_score_correction_bias = self.e_score_correction_bias.float()
        return self

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (N, d) -> scores (N, E) fp32 sigmoid affinities, indices (N, K), gates (N, K) fp32."""
        scores = F.linear(x.float(), self.weight.float()).sigmoid()  # (N, E)
        with torch.no_grad():
            choice = scores + self.e_score_correction_bias  # (N, E), selection only
            if self.n_group > 1:
                # Group-limited routing: keep the topk_group groups whose two best experts score highest.
                grouped = choice.view(-1, self.n_group, self.n_experts // self.n_group)  # (N, G, E/G)
                group_scores = grouped.topk(2, dim=-1)[0].sum(-1)  # (N, G)
                keep = torch.zeros_like(group_scores).scatter_(1, group_scores.topk(self.topk_group, dim=-1)[1], 1.0)
                choice = choice.masked_fill(~keep.bool().repeat_interleave(self.n_experts // self.n_group, 1), -1e30)
            idx = choice.topk(self.top_k, dim=-1)[1]  # (N, K)
        gates = scores.gather(1, idx)
        gates = gates / (gates.sum(-1, keepdim=True) + 1e-20) * self.route_scale  # normalised over the selected
        return scores, idx, gates

    @torch.no_grad()
    def update_bias(self, load: torch.Tensor, gamma: float) -> None:
        """Auxiliary-loss-free balancing: bias += gamma * sign(mean load - load) (over- down, under-loaded up)."""
        if gamma:
            load = load.to(self.e_score_correction_bias)
            self.e_score_correction_bias += gamma * torch.sign(load.mean() - load)


class Experts(nn.Module):
    """E SwiGLU experts as stacked weights; tokens are sorted by expert and run as grouped matmuls (or one matmul pair
    per expert, `impl=loop`), never a per-token loop."""

    _liger = None
    """liger_kernel.transformers.functional when model.kernels=liger (fused silu(gate) * up)."""

    def __init__(self, n_experts: int, d_model: int, hidden: int, impl: str = "auto") -> None:
        super().__init__()
        self.n_experts, self.impl = n_experts, impl
        self.gate_up_proj = nn.Parameter(torch.empty(n_experts, 2 * hidden, d_model))  # [gate; up], as HF
        self.down_proj = nn.Parameter(torch.empty(n_experts, d_model, hidden))

    def _grouped(self, x: torch.Tensor) -> bool:
        if self.impl != "auto":
            return self.impl == "grouped_mm"
        if x.device.type == "cuda":  # PyTorch's CUDA grouped GEMM is bf16-only
            return torch.is_autocast_enabled("cuda") or x.dtype == torch.bfloat16
        return x.device.type == "cpu"

    def forward(self, x: torch.Tensor, idx: torch.Tensor, gates: torch.Tensor) -> torch.Tensor:
        """x (N, d), idx/gates (N, K) -> sum_k gates[:, k] * expert_{idx[:, k]}(x), (N, d). No token is dropped."""
        K = idx.size(1)
        flat = idx.flatten()  # (N*K,)
        order = flat.argsort(stable=True)
        token = order // K
        xs = x[token]  # (N*K, d), grouped by expert
        # The gate scales the expert's hidden activation rather than its output (the same, down_proj being linear):
        # no (N*K, d) fp32 product is kept for backward.
        g_sorted = gates.flatten()[order, None]
        counts = torch.bincount(flat, minlength=self.n_experts)
        if self._grouped(xs):
            # Every expert weight takes part (empty groups get zero gradients): no ZeRO-3 gather/reduce mismatch.
            dt = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else xs.dtype
            offs = counts.cumsum(0).to(torch.int32)
            h = torch._grouped_mm(xs.to(dt), self.gate_up_proj.to(dt).transpose(-2, -1), offs=offs)
            g, u = h.chunk(2, dim=-1)
            a = ((F.silu(g) * u if self._liger is None else self._liger.liger_swiglu(g, u)) * g_sorted).to(dt)
            ys = torch._grouped_mm(a, self.down_proj.to(dt).transpose(-2, -1), offs=offs)
        else:
            outs = []
            # An expert with no tokens still runs on an empty slice, so every rank touches every expert weight.
            for e, chunk in enumerate(xs.split(counts.tolist())):
                g, u = F.linear(chunk, self.gate_up_proj[e]).chunk(2, dim=-1)
                act = F.silu(g) * u if self._liger is None else self._liger.liger_swiglu(g, u)
                outs.append(F.linear((act * g_sorted[: chunk.size(0)]).to(g.dtype), self.down_proj[e]))
                g_sorted = g_sorted[chunk.size(0) :]
            ys = torch.cat(outs)
        return torch.zeros_like(x).index_add_(0, token, ys.to(x.dtype))


def sequence_balance_loss(scores: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """DeepSeek-V3 sequence-wise balance loss sum_i f_i P_i, averaged over sequences (multiply by alpha).

    scores (B, T, E) sigmoid affinities; idx (B, T, K) selected experts. f_i = E / (K T) * tokens routed to i;
    P_i = mean over the sequence of the affinities normalised over all experts.
    """
    B, T, E = scores.shape
    K = idx.size(-1)
    counts = scores.new_zeros(B, E).scatter_add_(1, idx.reshape(B, -1), scores.new_ones(B, T * K))
    f = counts * (E / (K * T))
    p = (scores / scores.sum(-1, keepdim=True)).mean(1)  # (B, E)
    return (f * p).sum(-1).mean()


class MLP(nn.Module):
    """SwiGLU feed-forward: down(silu(gate(x)) * up(x)), no biases."""

    _liger = None
    """liger_kernel.transformers.functional when model.kernels=liger (fused silu(gate) * up)."""

    def __init__(self, d_model: int, hidden: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(d_model, hidden, bias=False)
        self.up_proj = nn.Linear(d_model, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._liger is not None:
            return self.down_proj(self._liger.liger_swiglu(self.gate_proj(x), self.up_proj(x)))
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class MoE(nn.Module):
    """Shared experts (always on) + routed experts. Forward records `last_load` (E,) and `last_aux` (scalar)."""

    def __init__(self, d_model: int, cfg: MoEConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.gate = Router(d_model, cfg)
        self.experts = Experts(cfg.n_routed_experts, d_model, cfg.ffn_hidden, cfg.expert_impl)
        self.shared_experts = MLP(d_model, cfg.ffn_hidden * cfg.n_shared_experts) if cfg.n_shared_experts else None
        self.last_load: torch.Tensor | None = None
        self.last_aux: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, T, d) -> (B, T, d)."""
        B, T, d = x.shape
        flat = x.reshape(B * T, d)
        scores, idx, gates = self.gate(flat)
        y = self.experts(flat, idx, gates).view(B, T, d)
        if self.shared_experts is not None:
            y = y + self.shared_experts(x)
        self.last_load = torch.bincount(idx.flatten(), minlength=self.cfg.n_routed_experts).float()
        self.last_aux = None
        if self.training and self.cfg.seq_alpha > 0:
            self.last_aux = sequence_balance_loss(scores.view(B, T, -1), idx.view(B, T, -1))
        return y


def max_violation(loads: torch.Tensor) -> float:
    """max over layers of (max expert load / mean load - 1); loads (L, E)."""
    mean = loads.mean(-1).clamp_min(1e-9)
    return float((loads.amax(-1) / mean - 1).amax())
