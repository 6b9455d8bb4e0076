"""DeepSeekMoE: sigmoid top-k router with an auxiliary-loss-free balancing bias, grouped experts, shared experts.

Parameter and buffer names follow Hugging Face `DeepseekV3MoE` (`gate.weight`, `gate.e_score_correction_bias`,
`experts.gate_up_proj`, `experts.down_proj`, `shared_experts.*`), so export is a rename of the prefix only.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from model.accelerator import grouped_mm_supported
from model.config import MoEConfig


def swiglu(g: torch.Tensor, u: torch.Tensor, liger=None) -> torch.Tensor:
    """silu(g) * u, through liger-kernel's fused kernel when `liger` (its functional module) is given."""
    return F.silu(g) * u if liger is None else liger.liger_swiglu(g, u)


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


class ExpertDispatcher:
    """Moves routed token copies to the ranks that hold their experts and back (expert parallelism).

    This base class is the single-process case: every expert is local, nothing moves. `train/` injects a subclass
    that exchanges rows between the `ep_size` ranks of an expert-parallel group with all-to-all, so the model never
    imports torch.distributed. Rank `ep_rank` holds global experts [ep_rank * E / ep_size, (ep_rank + 1) * E / ep_size).
    """

    ep_size: int = 1
    ep_rank: int = 0

    def plan(self, counts: torch.Tensor) -> tuple[torch.Tensor, object]:
        """counts (E,) rows this rank sends per global expert -> rows it will receive per (source rank, local
        expert), (ep_size, E / ep_size), and a handle for `dispatch` / `combine`."""
        return counts.view(1, -1), None

    def dispatch(self, t: torch.Tensor, handle: object) -> torch.Tensor:
        """Rows (M, ...) sorted by global expert -> the rows received here (M', ...), by source rank then expert."""
        return t

    def combine(self, t: torch.Tensor, handle: object) -> torch.Tensor:
        """Inverse of `dispatch`: expert outputs (M', d) in received order -> (M, d) in the sender's order."""
        return t


class Experts(nn.Module):
    """SwiGLU experts as stacked weights; tokens are sorted by expert and run as grouped matmuls (or one matmul pair
    per expert, `impl=loop`), never a per-token loop.

    With a dispatcher of ep_size > 1 this rank holds only its E / ep_size local experts (`expert_offset` is the
    global id of the first); the weights keep HF's names, and the full (E, ...) tensors are these slices stacked in
    rank order.
    """

    _liger = None
    """liger_kernel.transformers.functional when execution.kernels=liger (fused silu(gate) * up)."""

    def __init__(
        self, n_experts: int, d_model: int, hidden: int, impl: str = "auto", dispatcher: ExpertDispatcher | None = None
    ) -> None:
        super().__init__()
        self.n_experts, self.impl = n_experts, impl
        self.dispatcher = dispatcher or ExpertDispatcher()
        self.n_local = n_experts // self.dispatcher.ep_size
        self.expert_offset = self.dispatcher.ep_rank * self.n_local
        self.gate_up_proj = nn.Parameter(torch.empty(self.n_local, 2 * hidden, d_model))  # [gate; up], as HF
        self.down_proj = nn.Parameter(torch.empty(self.n_local, d_model, hidden))

    def _grouped(self, x: torch.Tensor) -> bool:
        if self.impl == "grouped_mm" and not hasattr(torch, "_grouped_mm"):
            raise RuntimeError(
                f"execution.expert_impl=grouped_mm needs torch._grouped_mm (PyTorch 2.8 or newer; this is "
                f"{torch.__version__}): upgrade PyTorch or set execution.expert_impl=loop"
            )
        if self.impl != "auto":
            return self.impl == "grouped_mm"
        if not hasattr(torch, "_grouped_mm"):
            return False
        return grouped_mm_supported(x)

    def _compute(self, xs: torch.Tensor, g_sorted: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """xs (M, d) grouped by local expert, g_sorted (M, 1) their gates, counts (n_local,) rows per expert ->
        gate-weighted expert outputs (M, d), same order."""
        # The gate scales the expert's hidden activation rather than its output (the same, down_proj being linear):
        # no (M, d) fp32 product is kept for backward.
        if self._grouped(xs):
            # Every expert weight takes part (empty groups get zero gradients): no ZeRO-3 gather/reduce mismatch.
            dt = torch.get_autocast_dtype(xs.device.type) if torch.is_autocast_enabled(xs.device.type) else xs.dtype
            offs = counts.cumsum(0).to(torch.int32)
            h = torch._grouped_mm(xs.to(dt), self.gate_up_proj.to(dt).transpose(-2, -1), offs=offs)
            g, u = h.chunk(2, dim=-1)
            a = (swiglu(g, u, self._liger) * g_sorted).to(dt)
            return torch._grouped_mm(a, self.down_proj.to(dt).transpose(-2, -1), offs=offs)
        outs = []
        # An expert with no tokens still runs on an empty slice, so every rank touches every expert weight.
        for e, chunk in enumerate(xs.split(counts.tolist())):
            g, u = F.linear(chunk, self.gate_up_proj[e]).chunk(2, dim=-1)
            act = swiglu(g, u, self._liger) * g_sorted[: chunk.size(0)]
            outs.append(F.linear(act.to(g.dtype), self.down_proj[e]))
            g_sorted = g_sorted[chunk.size(0) :]
        return torch.cat(outs)

    def forward(
        self, x: torch.Tensor, idx: torch.Tensor, gates: torch.Tensor, counts: torch.Tensor | None = None
    ) -> torch.Tensor:
        """x (N, d), idx/gates (N, K) -> sum_k gates[:, k] * expert_{idx[:, k]}(x), (N, d). No token is dropped.
        `counts` (E,): rows routed to each global expert, when the caller has them already."""
        K = idx.size(1)
        flat = idx.flatten()  # (N*K,)
        order = flat.argsort(stable=True)
        token = order // K
        xs = x[token]  # (N*K, d), grouped by global expert
        g_sorted = gates.flatten()[order, None]  # (N*K, 1), fp32 as HF
        if counts is None:
            counts = torch.bincount(flat, minlength=self.n_experts)  # (E,)
        d = self.dispatcher
        if d.ep_size == 1:
            ys = self._compute(xs, g_sorted, counts)
        else:
            # Split sizes first (a host sync: all_to_all needs them), then token copies and their gates.
            recv_counts, handle = d.plan(counts)  # (ep_size, n_local)
            xr, gr = d.dispatch(xs, handle), d.dispatch(g_sorted, handle)
            # Received rows come grouped by source rank, then local expert; regroup them by local expert.
            local_id = torch.arange(self.n_local, device=x.device).repeat(recv_counts.size(0))
            by_expert = local_id.repeat_interleave(recv_counts.flatten()).argsort(stable=True)  # (M',)
            out = self._compute(xr[by_expert], gr[by_expert], recv_counts.sum(0))
            ys = d.combine(out[by_expert.argsort()], handle)  # back in `order`, (N*K, d)
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
    """liger_kernel.transformers.functional when execution.kernels=liger (fused silu(gate) * up)."""

    def __init__(self, d_model: int, hidden: int) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(d_model, hidden, bias=False)
        self.up_proj = nn.Linear(d_model, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(swiglu(self.gate_proj(x), self.up_proj(x), self._liger))


class MoE(nn.Module):
    """Shared experts (always on) + routed experts.

    The router, its bias and the returned load always cover all E experts (every rank routes over the global set);
    only the routed experts' weights are sharded when `dispatcher.ep_size > 1`.
    """

    def __init__(
        self, d_model: int, cfg: MoEConfig, dispatcher: ExpertDispatcher | None = None, expert_impl: str = "auto"
    ) -> None:
        super().__init__()
        self.cfg = cfg
        self.gate = Router(d_model, cfg)
        self.experts = Experts(cfg.n_routed_experts, d_model, cfg.ffn_hidden, expert_impl, dispatcher)
        self.shared_experts = MLP(d_model, cfg.ffn_hidden * cfg.n_shared_experts) if cfg.n_shared_experts else None

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """x (B, T, d) -> y (B, T, d), load (E,) float routed-token counts, and in training mode the unweighted
        sequence-wise balance loss (scalar; None in evaluation)."""
        B, T, d = x.shape
        flat = x.reshape(B * T, d)
        scores, idx, gates = self.gate(flat)
        counts = torch.bincount(idx.flatten(), minlength=self.cfg.n_routed_experts)  # (E,), dispatch and load
        y = self.experts(flat, idx, gates, counts).view(B, T, d)
        if self.shared_experts is not None:
            y = y + self.shared_experts(x)
        aux = sequence_balance_loss(scores.view(B, T, -1), idx.view(B, T, -1)) if self.training else None
        return y, counts.float(), aux


def max_violation(loads: torch.Tensor) -> float:
    """max over layers of (max expert load / mean load - 1); loads (L, E)."""
    mean = loads.mean(-1).clamp_min(1e-9)
    return float((loads.amax(-1) / mean - 1).amax())
