"""Muon for the hidden weight matrices, AdamW for the rest, as one torch optimizer that works on whole parameters
(no ZeRO) or on ZeRO 1-3's flat fp32 partitions.

Muon (Keller Jordan; Moonlight's scaling): m <- lerp(m, g, 1 - mu); u = lerp(g, m, mu) (Nesterov) or m;
O = NS_k(u) (k quintic Newton-Schulz steps, the matrix first scaled to Frobenius norm 1); p <- p (1 - lr wd) - lr
rms_scale sqrt(max(fan_out, fan_in)) O. The rms_scale (0.2) gives O AdamW's update RMS, so AdamW's lr and weight
decay carry over. Stacked routed experts are orthogonalized per expert (and their fused [gate; up] as two matrices).

ZeRO splits parameters across ranks in flat partitions, but Newton-Schulz needs whole matrices. The momentum is
elementwise, so it lives (and is checkpointed) in the partition's layout like Adam's moments; at each step every
rank all-gathers the momentum-updated partitions of a flat group over the group's process group (all ranks, or the
expert-data-parallel group for routed experts), rebuilds the matrices that touch its own partition, orthogonalizes
them and keeps its own elements of the result (`train.engine.deepspeed_compat.zero_flat_layouts` says where each
parameter's elements are). Under ZeRO-1/2 a rank orthogonalizes only the matrices in its partition (about 1/world of
them, plus those split across its boundaries); under ZeRO-3 every parameter is split across all ranks, so every rank
orthogonalizes every matrix of the sub-group. The all-gather moves the group's size once per step (the same volume
as ZeRO-1/2's parameter all-gather) and needs a transient full-size fp32 buffer.

Tensor parallelism (AutoTP) gives a rank a slice of some matrices: column-parallel weights (q/k/v, MLA q_b/kv_b,
gate/up) a block of output rows, row-parallel ones (o_proj, down_proj) a block of input columns. Orthogonalizing a
slice alone would be another update (a different matrix's polar factor, scaled by the slice's shape), so once the
rank has the direction of its slices (whole, or rebuilt from ZeRO's partitions as above), each matrix is orthogonalized
whole by one rank of the tensor-parallel group (largest first, to the least loaded rank): one all-to-all sends it the
other ranks' slices, it runs Newton-Schulz with the scale from the whole matrix's shape, and a second all-to-all
returns every rank its slice of the result. Both move this rank's slices once, and the Newton-Schulz work is split
over the group rather than repeated on every rank. Replicated weights are stepped as without tensor parallelism.

The momentum is stored under Adam's first-moment key `exp_avg` and `state_dict` adds a zero `exp_avg_sq`, because
DeepSpeed's universal-checkpoint tools (resharded resume) carry exactly those keys.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import nn

from model import accelerator
from model.loss import LMHead
from model.moe import Experts, Router
from train.config import MuonConfig, OptimConfig
from train.engine.deepspeed_compat import FlatLayout, FlatParam, TPShard

MatrixSpec = tuple[int, int, int]
"""A parameter seen as a batch of matrices: (count, fan_out, fan_in)."""


def matrix_spec(module: nn.Module, pname: str, shape: torch.Size) -> MatrixSpec:
    """How Muon sees a hidden weight: a Linear's (out, in) weight is one matrix; stacked routed experts (E, out, in)
    are E matrices, and the fused `gate_up_proj` (E, 2h, d) is 2E matrices (h, d), gate and up apart as in a dense
    MLP."""
    if isinstance(module, Experts):
        E, rows, cols = shape
        return (2 * E, rows // 2, cols) if pname == "gate_up_proj" else (E, rows, cols)
    if len(shape) != 2:
        raise ValueError(f"Muon got a {len(shape)}-D weight {pname} of {type(module).__name__}: no matrix rule")
    return (1, shape[0], shape[1])


def split_params(model: nn.Module) -> tuple[list[tuple[str, nn.Parameter, MatrixSpec]], list[tuple[str, nn.Parameter]]]:
    """(Muon parameters with their matrix view, AdamW parameters), by name. Muon: every weight of 2 or more
    dimensions except embeddings, the output head and MoE routers (attention and MLA projections, dense MLPs, shared
    and routed experts, MTP projections and blocks). AdamW: those, norms and biases. Tied weights appear once."""
    muon, adam, seen = [], [], set()
    for mname, module in model.named_modules():
        for pname, p in module.named_parameters(recurse=False):
            if id(p) in seen or not p.requires_grad:
                continue
            seen.add(id(p))
            name = f"{mname}.{pname}" if mname else pname
            shape = getattr(p, "ds_shape", p.shape)  # ZeRO-3 partitioned parameters keep their shape there
            if len(shape) >= 2 and not isinstance(module, (nn.Embedding, LMHead, Router)):
                muon.append((name, p, matrix_spec(module, pname, shape)))
            else:
                adam.append((name, p))
    return muon, adam


def ns_dtype(cfg: MuonConfig, device: torch.device) -> torch.dtype:
    if cfg.ns_dtype == "auto":
        return torch.bfloat16 if accelerator.is_accelerator(device) else torch.float32
    return torch.bfloat16 if cfg.ns_dtype == "bf16" else torch.float32


def build_muon_optimizer(model: nn.Module, optim: OptimConfig, device: torch.device) -> MuonAdamW:
    """The param groups (AdamW with decay, AdamW without, Muon) and the optimizer; expert-parallel weights are put
    in DeepSpeed's MoE groups (partitioned over the expert-data-parallel group) as for AdamW."""
    mc = optim.muon
    muon, adam = split_params(model)
    matrices = [p for _, p in adam if len(getattr(p, "ds_shape", p.shape)) >= 2]
    vectors = [p for _, p in adam if len(getattr(p, "ds_shape", p.shape)) < 2]
    groups = [
        {"name": "decay", "use_muon": False, "params": matrices, "weight_decay": optim.weight_decay},
        {"name": "no_decay", "use_muon": False, "params": vectors, "weight_decay": 0.0},
        {"name": "muon", "use_muon": True, "params": [p for _, p, _ in muon],
         "lr": mc.lr if mc.lr is not None else optim.lr,
         "weight_decay": mc.weight_decay if mc.weight_decay is not None else optim.weight_decay},
    ]  # fmt: skip
    groups = [g for g in groups if g["params"]]
    if any(getattr(p, "allreduce", True) is False for g in groups for p in g["params"]):
        from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer

        groups = split_params_into_different_moe_groups_for_optimizer(groups)
    specs = {id(p): spec for _, p, spec in muon}
    return MuonAdamW(groups, specs, optim, ns_dtype(mc, device))


def orthogonalize(x: torch.Tensor, coefficients, steps: int, eps: float, dtype: torch.dtype) -> torch.Tensor:
    """Quintic Newton-Schulz of a batch of matrices x (n, rows, cols): about U V^T of each (torch.optim.Muon's
    iteration, batched)."""
    a, b, c = coefficients
    X = x.to(dtype)
    tall = x.size(-2) > x.size(-1)
    if tall:
        X = X.mT
    X = X / X.norm(dim=(-2, -1), keepdim=True).clamp(min=eps)
    for _ in range(steps):
        A = X @ X.mT
        B = b * A + c * (A @ A)
        X = a * X + B @ X
    if tall:
        X = X.mT
    return X.to(x.dtype)


class MuonAdamW(torch.optim.Optimizer):
    """One optimizer, two rules: groups with `use_muon` get Muon, the others AdamW (torch's formula).

    Parameters are whole tensors (no ZeRO), or ZeRO's flat fp32 partitions once `bind` has told it their layout."""

    def __init__(self, groups: list[dict], specs: dict[int, MatrixSpec], optim: OptimConfig, dtype: torch.dtype):
        mc = optim.muon
        defaults = {
            "lr": optim.lr, "weight_decay": optim.weight_decay, "betas": (optim.beta1, optim.beta2), "eps": optim.eps,
            "momentum": mc.momentum, "nesterov": mc.nesterov, "ns_steps": mc.ns_steps,
            "ns_coefficients": tuple(mc.ns_coefficients), "ns_eps": mc.eps, "rms_scale": mc.rms_scale,
        }  # fmt: skip
        super().__init__(groups, defaults)
        self.specs = specs
        self.ns_dtype = dtype
        self.layouts: dict[int, FlatLayout] = {}
        self.tp: dict[int, TPShard] = {}

    def bind(self, layouts: list[FlatLayout]) -> None:
        """ZeRO 1-3: the flat partitions this optimizer steps, and where each parameter's elements are in them."""
        self.layouts = {id(layout.flat): layout for layout in layouts}

    def bind_tensor_parallel(self, shards: dict[int, TPShard]) -> None:
        """Tensor parallelism: which Muon weights are a slice of a matrix (id(model parameter) -> its slice); their
        matrix view becomes the whole matrix's."""
        self.tp = {k: s for k, s in shards.items() if k in self.specs}
        for k, s in self.tp.items():
            if len(s.full) != 2:
                raise ValueError(f"tensor-parallel Muon weight of shape {tuple(s.full)}: only 2-D slices are handled")
            self.specs[k] = (1, *s.full)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not group["use_muon"]:
                for p in params:
                    self._adamw(p, group)
                continue
            for p in params:
                if id(p) in self.layouts:
                    self._muon_flat(p, self.layouts[id(p)], group)
            whole = [p for p in params if id(p) not in self.layouts]
            if whole:
                self._muon_whole(whole, group)
        return loss

    # --- AdamW -------------------------------------------------------------------------------------------------

    def _adamw(self, p: torch.Tensor, group: dict) -> None:
        """torch.optim.AdamW's single-tensor update (decoupled weight decay, bias-corrected moments)."""
        state = self.state[p]
        if "exp_avg" not in state:
            state["step"] = torch.tensor(0.0)
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        beta1, beta2 = group["betas"]
        lr, grad = group["lr"], p.grad
        state["step"] += 1
        step = float(state["step"])
        p.mul_(1 - lr * group["weight_decay"])
        state["exp_avg"].lerp_(grad, 1 - beta1)
        state["exp_avg_sq"].mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        denom = (state["exp_avg_sq"].sqrt() / math.sqrt(1 - beta2**step)).add_(group["eps"])
        p.addcdiv_(state["exp_avg"], denom, value=-lr / (1 - beta1**step))

    # --- Muon --------------------------------------------------------------------------------------------------

    def _momentum(self, p: torch.Tensor, group: dict) -> torch.Tensor:
        """Advance the momentum of p (whole or a flat partition) and return the Nesterov (or plain) direction."""
        state = self.state[p]
        if "exp_avg" not in state:
            state["step"] = torch.tensor(0.0)
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        state.pop("exp_avg_sq", None)  # a zero placeholder brought back by a universal checkpoint
        state["step"] += 1
        m, g, mu = state["exp_avg"], p.grad, group["momentum"]
        m.lerp_(g, 1 - mu)
        return g.lerp(m, mu) if group["nesterov"] else m.clone()

    def _orthogonal_update(self, u: torch.Tensor, spec: MatrixSpec, group: dict) -> torch.Tensor:
        """u (any shape with spec's numel) -> rms_scale * sqrt(max(fan_out, fan_in)) * NS(u), flattened."""
        n, rows, cols = spec
        o = orthogonalize(u.reshape(n, rows, cols), group["ns_coefficients"], group["ns_steps"], group["ns_eps"],
                          self.ns_dtype)  # fmt: skip
        return o.reshape(-1) * (group["rms_scale"] * math.sqrt(max(rows, cols)))

    def _updates(self, items: list[tuple[int, torch.Tensor]], group: dict) -> list[torch.Tensor]:
        """(id of a model weight, its direction u, whole or this rank's tensor-parallel slice, any shape) -> its
        orthogonal update in u's layout, flattened. Each sliced matrix is orthogonalized whole by one rank of its
        tensor-parallel group (the ranks of a group list the same weights in the same order): one all-to-all sends
        it every rank's slice, a second returns every rank its slice of the result."""
        out: list[torch.Tensor | None] = [None] * len(items)
        sliced = []
        for i, (key, u) in enumerate(items):
            if key in self.tp:
                sliced.append(i)
            else:
                out[i] = self._orthogonal_update(u, self.specs[key], group)
        if not sliced:
            return out
        first = self.tp[items[sliced[0]][0]]
        world, me = first.world, first.index
        for i in sliced:
            shard = self.tp[items[i][0]]
            if shard.group is not first.group or shard.local.numel() != items[i][1].numel():
                raise RuntimeError(f"tensor-parallel Muon weight {tuple(shard.full)}: slice or group mismatch")
        owner = self._owners([self.tp[items[i][0]] for i in sliced], world)
        by_rank = [[i for i, o in zip(sliced, owner, strict=True) if o == r] for r in range(world)]
        sizes = [sum(items[i][1].numel() for i in idx) for idx in by_rank]
        u0 = items[sliced[0]][1]

        def cat(chunks: list[torch.Tensor]) -> torch.Tensor:
            return torch.cat(chunks) if chunks else u0.new_empty(0)

        # To the owners: this rank's slice of every matrix, grouped by owner; back, rank t's chunk holds my slices.
        send = cat([items[i][1].reshape(-1) for idx in by_rank for i in idx])
        got = u0.new_empty(sizes[me] * world)
        dist.all_to_all_single(got, send, [sizes[me]] * world, sizes, group=first.group)
        chunks = got.view(world, sizes[me])
        results, offset = [], 0
        for i in by_rank[me]:
            key, n = items[i][0], items[i][1].numel()
            shard = self.tp[key]
            whole = torch.cat([c[offset : offset + n].view(shard.local) for c in chunks], dim=shard.dim)
            results.append((shard, self._orthogonal_update(whole, self.specs[key], group).view(shard.full)))
            offset += n
        pieces = []
        for r in range(world):
            for shard, o in results:
                rows = shard.local[shard.dim]
                pieces.append(o.narrow(shard.dim, r * rows, rows).reshape(-1))
        back = u0.new_empty(sum(sizes))
        dist.all_to_all_single(back, cat(pieces), sizes, [sizes[me]] * world, group=first.group)
        start = 0  # rank 0's chunk first, each in the owner's order
        for i in (i for idx in by_rank for i in idx):
            n = items[i][1].numel()
            out[i] = back[start : start + n]
            start += n
        return out

    @staticmethod
    def _owners(shards: list[TPShard], world: int) -> list[int]:
        """Which rank of the group orthogonalizes each matrix: largest Newton-Schulz cost (about m^2 n for m <= n)
        first, to the least loaded rank (the same answer on every rank)."""
        load, owner = [0] * world, [0] * len(shards)
        cost = [min(s.full) ** 2 * max(s.full) for s in shards]
        for j in sorted(range(len(shards)), key=lambda j: -cost[j]):
            owner[j] = min(range(world), key=lambda r: load[r])
            load[owner[j]] += cost[j]
        return owner

    def _muon_whole(self, params: list[torch.Tensor], group: dict) -> None:
        directions = [(id(p), self._momentum(p, group)) for p in params]
        for p, update in zip(params, self._updates(directions, group), strict=True):
            p.mul_(1 - group["lr"] * group["weight_decay"])
            p.add_(update.view_as(p), alpha=-group["lr"])

    def _muon_flat(self, flat: torch.Tensor, layout: FlatLayout, group: dict) -> None:
        u = self._momentum(flat, group)
        parts = [torch.empty_like(u) for _ in range(layout.world)]
        dist.all_gather(parts, u.contiguous(), group=layout.group)
        items, mine = [], []
        for fp in layout.params:
            segments = [s for s in fp.segments if s.rank == layout.rank]
            if not segments:
                continue
            # This rank's copy of the weight (under tensor parallelism, its slice), rebuilt from the partitions.
            whole = torch.empty(fp.shape.numel(), dtype=u.dtype, device=u.device)
            for s in fp.segments:
                whole[s.param_start : s.param_start + s.length] = parts[s.rank][s.offset : s.offset + s.length]
            items.append((id(fp.param), whole))
            mine.append(segments)
        update = torch.zeros_like(flat)
        for o, segments in zip(self._updates(items, group), mine, strict=True):
            for s in segments:
                update[s.offset : s.offset + s.length] = o[s.param_start : s.param_start + s.length]
        flat.mul_(1 - group["lr"] * group["weight_decay"])
        flat.add_(update, alpha=-group["lr"])

    # --- checkpoints -------------------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        """As torch's, plus a zero `exp_avg_sq` beside each Muon momentum: DeepSpeed's universal conversion reads
        both Adam keys from every group (dropped again at the next step after a load)."""
        sd = super().state_dict()
        for group in sd["param_groups"]:
            if group.get("use_muon"):
                for i in group["params"]:
                    st = sd["state"].get(i)
                    if st is not None and "exp_avg" in st and "exp_avg_sq" not in st:
                        sd["state"][i] = {**st, "exp_avg_sq": torch.zeros_like(st["exp_avg"])}
        return sd


# --- editing parameters under ZeRO (QK-clip) -------------------------------------------------------------------


def row_scaler(ds_engine):
    """A function (param, row_scale (rows,)) that multiplies the rows of a 2-D model weight in place, in the
    model's copy and in ZeRO's fp32 master partition (stage 1-3), so the change survives the next step."""
    from train.engine.deepspeed_compat import zero_flat_layouts

    where: dict[int, tuple[FlatLayout, FlatParam]] = {}
    if ds_engine.zero_optimization_stage() > 0:
        for layout in zero_flat_layouts(ds_engine):
            for fp in layout.params:
                where[id(fp.param)] = (layout, fp)

    @torch.no_grad()
    def scale_rows(param: nn.Parameter, row_scale: torch.Tensor) -> None:
        if id(param) not in where:  # no ZeRO: the module weight is the optimizer's parameter
            param.mul_(row_scale.to(param).view(-1, *([1] * (param.ndim - 1))))
            return
        layout, fp = where[id(param)]
        cols = fp.shape.numel() // fp.shape[0]
        per_elem = row_scale.to(torch.float32).repeat_interleave(cols)  # (numel,) in flattened order
        for s in fp.segments:
            if s.rank == layout.rank:
                seg = layout.flat[s.offset : s.offset + s.length]
                seg.mul_(per_elem[s.param_start : s.param_start + s.length].to(seg))
        if fp.lp_local:  # ZeRO-3: this rank's slice of the model weight
            local = param.ds_tensor.data.view(-1)
            start = layout.rank * fp.partition_numel
            n = max(0, min(fp.partition_numel, per_elem.numel() - start))
            local[:n].mul_(per_elem[start : start + n].to(local))
        else:
            param.data.mul_(row_scale.to(param).view(-1, *([1] * (param.ndim - 1))))

    return scale_rows


def all_reduce_max(t: torch.Tensor) -> torch.Tensor:
    """Elementwise max over all ranks, in place (no-op without a process group)."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t


class HeadMaxima:
    """Every attention head's largest logit over all ranks, from what this rank tracked. Under tensor parallelism
    (tp_size > 1) a rank holds the `index`-th of tp_size equal slices of consecutive heads of every layer (AutoTP
    splits q/k column-parallel), so its maxima go to their heads' positions before the max over all ranks."""

    def __init__(self, tp_size: int = 1) -> None:
        self.tp, self.index = tp_size, 0
        if tp_size > 1:
            from deepspeed.utils import groups

            self.index = groups.get_tensor_model_parallel_rank()

    def __call__(self, mine: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """mine (layers, this rank's heads) -> (every head's maximum (layers, heads), the part of it for this rank's
        heads), the same on every rank of a tensor-parallel group."""
        h = mine.size(1)
        every = torch.full((mine.size(0), h * self.tp), float("-inf"), dtype=mine.dtype, device=mine.device)
        every[:, self.index * h : (self.index + 1) * h] = mine
        all_reduce_max(every)
        return every, every[:, self.index * h : (self.index + 1) * h]


def check_optimizer(
    optim: OptimConfig,
    zero_stage: int,
    offload_optimizer: bool,
    bf16: bool,
    tp_size: int = 1,
    sp_size: int = 1,
    pp_size: int = 1,
    qk_norm: bool = False,
) -> None:
    """Refuse, before any process group exists, the combinations Muon and QK-clip do not support yet. Every
    tensor-parallel degree is supported (`tp_size` is taken with the rest of the layout, and refuses nothing)."""
    if optim.name == "muon" and offload_optimizer:
        raise ValueError(
            "optim=muon with deepspeed.offload_optimizer=true is not supported yet (DeepSpeed's CPU Adam steps "
            "the offloaded partitions): use optim=adamw, or deepspeed.offload_optimizer=false"
        )
    if pp_size > 1 and (optim.name == "muon" or optim.qk_clip.enabled or optim.qk_clip.log_max_logit):
        what = "optim=muon" if optim.name == "muon" else "optim.qk_clip"
        raise ValueError(
            f"{what} with pipeline parallelism (parallel.pp_size={pp_size}) is not supported yet (the pipeline engine "
            "owns the optimizer step and its stages' flat partitions): use optim=adamw with qk_clip off, or pp_size=1"
        )
    if optim.qk_clip.enabled or optim.qk_clip.log_max_logit:
        if sp_size > 1:
            raise ValueError(
                f"optim.qk_clip with sequence parallelism (sp_size={sp_size}) is not supported yet (a rank sees the "
                "logits of its shard of the sequence only): set optim.qk_clip.enabled=false "
                "optim.qk_clip.log_max_logit=false, or sp_size=1 (tensor parallelism works)"
            )
        if qk_norm and optim.qk_clip.enabled:
            raise ValueError(
                "optim.qk_clip.enabled=true with model.qk_norm=true: the per-head RMSNorm of q and k undoes the "
                "rescaling of their projections (and already bounds the logits): set optim.qk_clip.enabled=false"
            )
    edits_masters = optim.name == "muon" or optim.qk_clip.enabled
    if edits_masters and bf16 and zero_stage in (0, 1):
        what = "optim=muon" if optim.name == "muon" else "optim.qk_clip.enabled=true"
        raise ValueError(
            f"{what} with bf16 and deepspeed.zero_stage={zero_stage} is not supported yet (DeepSpeed's bf16 "
            "optimizer wrapper keeps its fp32 master weights in another layout): use deepspeed.zero_stage=2 or 3, "
            "or train.dtype=fp32"
        )
