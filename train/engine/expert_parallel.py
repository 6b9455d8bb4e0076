"""Expert parallelism: routed experts sharded over groups of `parallel.ep_size` ranks, tokens moved by all-to-all.

The model sees only `AllToAllDispatcher` (a `model.moe.ExpertDispatcher`). DeepSpeed sees expert parameters the way
its own MoE layers present them: `allreduce = False` and `group_name = "ep_size_N"`, their own optimizer param
groups, and its expert-parallel / expert-data-parallel process groups (deepspeed.utils.groups). So ZeRO 1, 2 and 3
partition expert weights (stage 3), gradients and optimizer states over the expert-data-parallel group (world /
ep_size ranks holding the same experts) and never reduce them across the expert-parallel group; expert gradients
are still averaged over all ranks, so a step equals the ep_size=1 step. Dense parameters are unchanged.
ZeRO 1/2 need a `deepspeed.moe.layer.MoE` in the model to take these paths (a parameterless marker child);
ZeRO-3 refuses that class and instead reads the per-parameter placement that DeepSpeed's AutoEP experts carry.

Layout (DeepSpeed's default, E + D): world 4, ep_size 2 -> expert-parallel groups [0, 1], [2, 3] (all-to-all);
expert-data-parallel groups [0, 2], [1, 3] (gradient reduction of expert parameters).
"""

from __future__ import annotations

import functools

import torch
import torch.distributed as dist
from torch import nn

from model.moe import ExpertDispatcher, Experts
from train.engine.deepspeed_compat import (
    create_expert_groups,
    expert_group_name,
    expert_parallel_group,
    expert_parallel_marker,
    place_zero3_expert_param,
)


class _AllToAll(torch.autograd.Function):
    """all_to_all_single with autograd: the backward pass sends gradients back along the same splits, reversed."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, out_splits: list[int], in_splits: list[int], group) -> torch.Tensor:
        ctx.splits, ctx.group = (out_splits, in_splits), group
        out = x.new_empty(sum(out_splits), *x.shape[1:])
        dist.all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        out_splits, in_splits = ctx.splits
        back = grad.new_empty(sum(in_splits), *grad.shape[1:])
        dist.all_to_all_single(back, grad.contiguous(), in_splits, out_splits, group=ctx.group)
        return back, None, None, None


class AllToAllDispatcher(ExpertDispatcher):
    """Sends each routed token copy to the rank of its expert and the expert's output back, over `group`.

    Every rank calls every collective in every MoE layer, with zero-sized splits where it has nothing to send, so an
    expert (or a whole rank) that receives no tokens cannot leave a peer waiting.
    """

    def __init__(self, group, ep_size: int, ep_rank: int) -> None:
        self.group, self.ep_size, self.ep_rank = group, ep_size, ep_rank

    def plan(self, counts: torch.Tensor) -> tuple[torch.Tensor, object]:
        # Split sizes first: how many rows each peer sends to each of this rank's local experts.
        recv_counts = torch.empty_like(counts)
        dist.all_to_all_single(recv_counts, counts, group=self.group)
        recv_counts = recv_counts.view(self.ep_size, -1)  # (source rank, local expert)
        in_splits = counts.view(self.ep_size, -1).sum(1).tolist()
        out_splits = recv_counts.sum(1).tolist()
        return recv_counts, (out_splits, in_splits)

    def dispatch(self, t: torch.Tensor, handle: object) -> torch.Tensor:
        out_splits, in_splits = handle
        return _AllToAll.apply(t, out_splits, in_splits, self.group)

    def combine(self, t: torch.Tensor, handle: object) -> torch.Tensor:
        out_splits, in_splits = handle
        return _AllToAll.apply(t, in_splits, out_splits, self.group)


def make_dispatcher(ep_size: int, pp_size: int = 1, tp_size: int = 1) -> AllToAllDispatcher | None:
    """Create DeepSpeed's expert-parallel and expert-data-parallel groups (collective; inside each pipeline stage when
    `pp_size` > 1, over the ranks of one tensor-parallel rank when `tp_size` > 1) and this rank's dispatcher."""
    if ep_size == 1:
        return None
    group = create_expert_groups(ep_size, pp_size, tp_size)
    return AllToAllDispatcher(group, ep_size, dist.get_rank(group=group))


def expert_params(model: nn.Module) -> list[nn.Parameter]:
    """The routed experts' weights of every MoE layer (the sharded parameters)."""
    return [p for m in model.modules() if isinstance(m, Experts) for p in (m.gate_up_proj, m.down_proj)]


MARKER = "deepspeed_ep_marker"
"""Attribute name of the marker on the model (a child module; it holds no state, so state dicts are unchanged)."""


def prepare_model(model: nn.Module, ep_size: int, zero_stage: int, tp_size: int = 1) -> None:
    """Tag the expert parameters as DeepSpeed does for its expert-parallel layers (before deepspeed.initialize).

    With tensor parallelism (`tp_size` > 1) the ranks of a tensor-parallel group see the same tokens and hold the
    same experts, so each computes the same expert gradients and their expert-data-parallel group (which contains
    them) would count them `tp_size` times: each gradient is divided by `tp_size` as it is produced. Their ZeRO
    partitions of those experts differ, so every rank counts its own in the gradient norm (`model_parallel`, as for
    a tensor-parallel shard) instead of only tensor-parallel rank 0."""
    name = expert_group_name(ep_size)
    for p in expert_params(model):
        p.allreduce = False  # DeepSpeed's mark of an expert-parallel parameter
        p.group_name = name
        if zero_stage == 3:
            place_zero3_expert_param(p, name)
        if tp_size > 1:
            p.model_parallel = True
            p.register_hook(functools.partial(torch.div, other=tp_size))
    if zero_stage < 3:  # under ZeRO-3 the engine refuses native MoE layers; the placement above is enough there
        model.add_module(MARKER, expert_parallel_marker(ep_size, model.cfg.moe.n_routed_experts))


def is_expert_param(p: torch.Tensor) -> bool:
    return getattr(p, "allreduce", True) is False


def has_expert_params(model: nn.Module) -> bool:
    return any(is_expert_param(p) for p in model.parameters())


def gather_experts(p: torch.Tensor) -> torch.Tensor:
    """Full (E, ...) tensor of a sharded expert parameter, stacked in expert-parallel rank order (collective)."""
    group = expert_parallel_group(p.group_name)
    parts = [torch.empty_like(p.data) for _ in range(dist.get_world_size(group=group))]
    dist.all_gather(parts, p.data.contiguous(), group=group)
    return torch.cat(parts)


@torch.no_grad()
def load_local_experts(model: nn.Module, weights: str) -> None:
    """Copy this rank's slices of the full expert weights in `weights` (model.safetensors) into its parameters.

    DeepSpeed writes the model-states file of an MoE run from data-parallel rank 0 only, so on resume every rank
    loads rank 0's local experts into its own. ZeRO 1/2 restore each rank's fp32 master partition correctly but
    copy it into the module's weights only at the next optimizer step, after a forward with the wrong experts.
    """
    from safetensors import safe_open

    with safe_open(weights, framework="pt") as f:
        for name, module in model.named_modules():
            # ZeRO-3 partitions are restored by the engine from each rank's own optimizer file.
            if isinstance(module, Experts) and module.dispatcher.ep_size > 1 and not hasattr(module.down_proj, "ds_id"):
                local = slice(module.expert_offset, module.expert_offset + module.n_local)
                for pname in ("gate_up_proj", "down_proj"):
                    param = getattr(module, pname)
                    param.copy_(f.get_slice(f"{name}.{pname}")[local].to(param))
