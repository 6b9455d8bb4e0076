"""Pipeline parallelism: DeepSpeed's `PipelineModule` over our Transformer's own modules, and `PipelineEngine`, the
`Engine` whose step is DeepSpeed's `train_batch()` (its 1F1B schedule over the step's micro-batches).

Stages. The layer list is [embedding, decoder block 0 .. n-1, head, embedding again when the last stage needs it
(tied output head or MTP)]; DeepSpeed balances the decoder blocks over `pp_size` stages (`type:PipeBlock`), so the
embedding is in the first stage and the final norm, output head and MTP blocks in the last. The two embeddings are
one `TiedLayerSpec`: DeepSpeed sums their gradients over the tie group, and counts the copy once in the norm.

Between stages travel (x, ids) for dense models and (x, aux, ids, loads) for MoE models: hidden states, the token
ids (every stage recomputes RoPE, document ids and the mask from them; the head needs them for MTP), the balance
losses of the MoE layers so far (one row per layer, differentiable, so the last stage's loss reaches every stage's
routers) and their routed-token counts (int64: no gradient). The last stage assembles the same typed `ModelOutput`
as `Transformer.forward`, rows in `moe_layers()` order, and the trainer's objective turns it into the loss there.

Every rank first builds the whole model with the same seed (same initial weights as a single rank), then keeps only
its stage: the other stages' parameters are moved to the meta device after `deepspeed.initialize`.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from model.config import ModelConfig
from model.moe import Experts, MoE
from model.output import ModelOutput
from model.transformer import BlockRunner, Transformer
from train.engine.deepspeed_engine import Engine
from train.engine.expert_parallel import MARKER, gather_experts, is_expert_param


class _Shared:
    """What the stage modules of one rank share without registering it: the whole model (for `context` and
    `head`), the MoE row of each decoder layer, and the context of the micro-batch being run."""

    def __init__(self, model: Transformer) -> None:
        self.model = model
        rows = [i for i, layer in enumerate(model.layers) if isinstance(layer.mlp, MoE)]
        self.row = {layer: r for r, layer in enumerate(rows)}
        self.n_moe = len(rows)
        self.n_experts = model.cfg.moe.n_routed_experts
        self._ctx: tuple[torch.Tensor, object] | None = None

    def context(self, ids: torch.Tensor):
        """`Transformer.context` of `ids`, computed once per micro-batch and stage (ids travels as one tensor)."""
        if self._ctx is None or self._ctx[0] is not ids:
            self._ctx = (ids, self.model.context(ids))
        return self._ctx[1]

    def pack(self, x, ids, aux=None, loads=None) -> tuple:
        return (x, aux, ids, loads) if self.n_moe else (x, ids)

    def unpack(self, inputs: tuple):
        if self.n_moe:
            x, aux, ids, loads = inputs
            return x, ids, aux, loads
        x, ids = inputs
        return x, ids, None, None


class Embedding(nn.Module):
    """The token embedding, as DeepSpeed's tied layer (first stage; last stage too when it needs it)."""

    def __init__(self, model: Transformer) -> None:
        super().__init__()
        self.embed_tokens = model.embed_tokens


def _enter(shared: _Shared, embedding: Embedding, ids: torch.Tensor) -> tuple:
    """First stage: token ids (B, T) -> the activations that travel."""
    x = embedding.embed_tokens(ids)
    if not shared.n_moe:
        return shared.pack(x, ids)
    # A leaf that requires grad: a stage without MoE layers passes it on, and DeepSpeed's backward needs every
    # floating output to be differentiable.
    aux = x.new_zeros(shared.n_moe).requires_grad_()
    loads = torch.zeros(shared.n_moe, shared.n_experts, dtype=torch.long, device=ids.device)
    return shared.pack(x, ids, aux, loads)


def _pass(embedding: Embedding, inputs: tuple) -> tuple:
    """The last stage's copy of the tied embedding: used by the head (MTP, tied output head), not in the chain."""
    return inputs


class PipeBlock(nn.Module):
    """Decoder block `index` as a pipeline layer."""

    def __init__(self, shared: _Shared, index: int) -> None:
        super().__init__()
        self.block = shared.model.layers[index]
        self.index = index
        self._shared = (shared,)  # a tuple: not a submodule

    def forward(self, inputs: tuple) -> tuple:
        shared = self._shared[0]
        x, ids, aux, loads = shared.unpack(inputs)
        ctx = shared.context(ids)
        x, load, a = self.block(x, ctx.cos, ctx.sin, ctx.mask)
        row = shared.row.get(self.index)
        if row is not None:
            one = torch.zeros(shared.n_moe, dtype=torch.long, device=ids.device)
            one[row] = 1
            loads = loads + one[:, None] * load.long()[None, :]
            if a is not None:
                aux = aux + one.to(aux.dtype) * a
        return shared.pack(x, ids, aux, loads)


class PipeHead(nn.Module):
    """The final norm, the output head (when not tied) and the MTP blocks; computed by `loss`, on the last stage."""

    def __init__(self, shared: _Shared) -> None:
        super().__init__()
        model = shared.model
        self.norm = model.norm
        if not model.cfg.tie_embeddings:
            self.lm_head = model.lm_head
        if model.cfg.mtp.depth:
            self.mtp = model.mtp
        self._shared = (shared,)

    def forward(self, inputs: tuple) -> tuple:
        return inputs

    def output(self, inputs: tuple, labels: torch.Tensor) -> ModelOutput:
        """The last stage's activations and the labels -> the `ModelOutput` of `Transformer.forward`."""
        shared = self._shared[0]
        model = shared.model
        model.training = self.training  # Transformer.head reads its own flag; its submodules follow the stage's
        x, ids, aux, loads = shared.unpack(inputs)
        run = BlockRunner()
        more_loads, more_aux = run.loads, run.auxes
        _, ce_loss, mtp_losses = model.head(x, ids, labels, shared.context(ids), run)
        if not shared.n_moe:
            return ModelOutput(ce_loss=ce_loss, mtp_losses=mtp_losses)
        loads = torch.cat([loads.to(torch.float32), *(load[None].float() for load in more_loads)])
        aux_losses = torch.cat([aux, *(a.reshape(1) for a in more_aux)]) if self.training else None
        return ModelOutput(ce_loss=ce_loss, aux_losses=aux_losses, mtp_losses=mtp_losses, expert_loads=loads)


TIED_EMBEDDING = "tied_modules.embed."
"""Prefix of the tied embedding's names in the PipelineModule (DeepSpeed's `tied_modules.<key>.`)."""


def model_param_name(pipe_name: str, n_layers: int) -> str:
    """The `Transformer` name of a parameter or buffer named `pipe_name` in `build_pipeline`'s PipelineModule.

    DeepSpeed names each layer by its index in the layer list ([embedding, decoder blocks, head, embedding]) and the
    tied embedding `tied_modules.embed.*`. Checkpoint conversion relies on it (train/checkpoint/pipeline_universal.py);
    `PipelineEngine` checks it against the live modules at every start."""
    if pipe_name.startswith(TIED_EMBEDDING):
        return pipe_name[len(TIED_EMBEDDING) :]
    index, _, rest = pipe_name.partition(".")
    if index.isdigit() and 1 <= int(index) <= n_layers and rest.startswith("block."):
        return f"layers.{int(index) - 1}.{rest[len('block.') :]}"
    if index.isdigit() and int(index) == n_layers + 1:
        return rest  # PipeHead: norm, lm_head, mtp
    raise ValueError(f"{pipe_name!r} is not a parameter name of a {n_layers}-layer pipeline built by build_pipeline")


def build_pipeline(model: Transformer, pp_size: int):
    """DeepSpeed's PipelineModule of `model` in `pp_size` stages (collective: creates the pipeline's groups).

    With expert parallelism (the expert groups were made inside each stage by `make_dispatcher`), the stage carries
    DeepSpeed's MoE marker, so its ZeRO-1 optimizer partitions and reduces the expert weights over the stage's
    expert-data-parallel group, as a non-pipeline job does over all ranks."""
    from deepspeed.pipe import PipelineModule, TiedLayerSpec

    shared = _Shared(model)
    embed = functools.partial(TiedLayerSpec, "embed", Embedding, model, tied_weight_attr=["embed_tokens.weight"])
    layers: list = [embed(forward_fn=functools.partial(_enter, shared))]
    layers += [PipeBlock(shared, i) for i in range(len(model.layers))]
    layers.append(PipeHead(shared))
    if model.cfg.tie_embeddings or model.cfg.mtp.depth:
        layers.append(embed(forward_fn=_pass))
    # dynamic_shape: validation batches may be shorter than training ones (the stages re-send shapes each time).
    # no_grad: the constructor broadcasts the tied embedding in place, which autograd would otherwise record.
    with torch.no_grad():
        pipe = PipelineModule(layers, num_stages=pp_size, partition_method="type:PipeBlock", dynamic_shape=True)
    marker = getattr(model, MARKER, None)
    if marker is not None:
        _check_experts_in_every_stage(model, pipe, layers, marker.ep_size)
        pipe.add_module(MARKER, marker)
    return pipe


@functools.cache
def stage_layers(n_layers: int, pp_size: int, trailing_embedding: bool) -> tuple[tuple[int, ...], ...]:
    """The decoder layers each stage holds: DeepSpeed's `type:PipeBlock` partition of `build_pipeline`'s layer list
    ([embedding, n_layers blocks, head, and the tied embedding when `trailing_embedding`]), i.e. its
    `partition_balanced` over weight 1 per block. Computed before any process group exists, so a layout is checked
    before any work; `build_pipeline` checks it against the partition DeepSpeed made."""
    from deepspeed.runtime.utils import partition_balanced

    weights = [0, *([1] * n_layers), 0, *([0] if trailing_embedding else [])]
    parts = partition_balanced(weights, pp_size)
    return tuple(tuple(i - 1 for i in range(parts[s], parts[s + 1]) if 1 <= i <= n_layers) for s in range(pp_size))


def check_experts_in_every_stage(cfg: ModelConfig, pp_size: int, ep_size: int) -> None:
    """Expert parallelism in a pipeline needs routed experts in every stage: ZeRO-1 reduces the gradient norm over
    the stages once per optimizer parameter group, and a stage with expert weights has one group more."""
    stages = stage_layers(cfg.n_layers, pp_size, cfg.tie_embeddings or bool(cfg.mtp.depth))
    for stage, blocks in enumerate(stages):
        mtp = stage == pp_size - 1 and bool(cfg.mtp.depth)  # the MTP blocks (MoE layers) live in the last stage
        if not mtp and not any(cfg.is_moe_layer(i) for i in blocks):
            raise ValueError(
                f"parallel.ep_size={ep_size} with parallel.pp_size={pp_size}: pipeline stage {stage} holds decoder "
                f"layers {list(blocks)}, none of them MoE (model.moe.first_k_dense={cfg.moe.first_k_dense}), and "
                "expert parallelism needs routed experts in every stage. Use fewer stages or more layers per stage, "
                "or ep_size=1"
            )


def _check_experts_in_every_stage(model: Transformer, pipe: nn.Module, layers: list, ep_size: int) -> None:
    parts = pipe.parts
    made = tuple(
        tuple(layer.index for layer in layers[parts[s] : parts[s + 1]] if isinstance(layer, PipeBlock))
        for s in range(len(parts) - 1)
    )
    expected = stage_layers(model.cfg.n_layers, len(parts) - 1, len(layers) > model.cfg.n_layers + 2)
    if made != expected:  # the layout check ran on `stage_layers`: it must be the partition DeepSpeed made
        raise RuntimeError(f"DeepSpeed partitioned the pipeline as {made}, not {expected} (stage_layers): update it")
    check_experts_in_every_stage(model.cfg, len(parts) - 1, ep_size)


class PipelineEngine(Engine):
    """The `Engine` of a pipeline-parallel job: `train_batch` is DeepSpeed's `train_batch()`, `eval_loss` its
    `eval_batch()`; `module` is the whole `Transformer` (this stage's parameters live, the others on the meta
    device; every MoE router's bias is there, so the balancer updates them all alike)."""

    def __init__(self, ds_engine, scheduler, zero_stage: int, dp_rank: int, dp_size: int, model: Transformer):
        super().__init__(ds_engine, scheduler, zero_stage, dp_rank, dp_size)
        self.model = model
        pipe = ds_engine.module
        self._head = next(m for m in pipe.modules() if isinstance(m, PipeHead)) if ds_engine.is_last_stage() else None
        pipe.loss_fn = self._loss
        self._objective: Callable[[ModelOutput], torch.Tensor] | None = None
        self._decide: Callable[[], bool] | None = None
        self._decided: bool | None = None
        names = {id(p): n for n, p in model.named_parameters()}
        self._names = {n: p for p in pipe.parameters() if (n := names.get(id(p))) is not None}
        """This stage's parameters by their Transformer names (a tied embedding once)."""
        for pipe_name, p in pipe.named_parameters():
            if model_param_name(pipe_name, len(model.layers)) != names[id(p)]:
                raise RuntimeError(f"model_param_name({pipe_name!r}) is not {names[id(p)]!r}: update it")
        self._local_experts = {
            id(p): slice(m.expert_offset, m.expert_offset + m.n_local)
            for m in model.modules()
            if isinstance(m, Experts) and m.dispatcher.ep_size > 1
            for p in (m.gate_up_proj, m.down_proj)
        }
        """Expert parallelism: the rows of the full (E, ...) expert weights that this rank's slices hold."""
        _drop_other_stages(model, pipe)

    @property
    def module(self) -> torch.nn.Module:
        return self.model

    def _loss(self, outputs: tuple, labels: torch.Tensor) -> torch.Tensor:
        """DeepSpeed's `loss_fn` on the last stage: the objective in training, the mean CE in evaluation."""
        out = self._head.output(outputs, labels)
        if not self._head.training:
            return out.ce_loss
        loss = self._objective(out)
        if out.aux_losses is not None:
            # The balance losses travelled from the first stages: keep them in the graph even when the objective
            # weighs them 0, since every floating activation a stage received must get a gradient.
            loss = loss + 0.0 * out.aux_losses.sum()
        return loss

    def train_batch(self, micro: list, loss_fn: Callable[[ModelOutput], torch.Tensor], decide: Callable[[], bool]):
        """DeepSpeed's pipeline schedule over `micro`; `decide` runs (collectively) at the optimizer step."""
        self._objective, self._decide, self._decided = loss_fn, decide, None
        self._applied = False
        self.ds.train_batch(iter(micro))
        if self._decided is None:  # DeepSpeed skipped the optimizer (non-finite gradients): decide all the same
            self._decide_once()
        norm = self.ds.get_global_grad_norm()
        self._grad_norm = float(norm) if norm is not None else math.nan
        return self._applied

    def _decide_once(self) -> bool:
        if self._decided is None:
            self._decided = self._decide()
        return self._decided

    def _gated_step(self, *args, **kwargs):
        self._veto = self._decide_once()
        return super()._gated_step(*args, **kwargs)

    def eval_loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The micro-batch's mean CE, averaged over the pipelines (data-parallel ranks) and known on every stage."""
        return self.ds.eval_batch(iter([(x, y)]), num_micro_batches=1)

    def forward(self, x, y):
        raise RuntimeError("a pipeline-parallel engine runs whole batches: use train_batch or eval_loss")

    @torch.no_grad()
    def after_load(self, tag_dir: Path) -> None:
        """DeepSpeed's pipeline checkpoint has no file for a tied layer (its `layer_NN` files come from the
        stage's modules, and the tied embedding is reached through a function), and ZeRO copies its restored fp32
        partitions into the weights only at the next step: take this stage's weights from model.safetensors (this
        rank's slices of expert-parallel weights)."""
        from safetensors import safe_open

        with safe_open(str(tag_dir / "model.safetensors"), framework="pt") as f:
            for name, p in self._names.items():
                local = self._local_experts.get(id(p))
                p.copy_((f.get_tensor(name) if local is None else f.get_slice(name)[local]).to(p))

    def full_state_dict(self) -> dict[str, torch.Tensor] | None:
        """Full fp32 weights on rank 0, gathered from the first data-parallel rank of every stage (collective; expert
        weights first from the stage's expert-parallel group)."""
        mine: dict[str, torch.Tensor] = {}
        first = self.ds.grid.get_data_parallel_rank() == 0
        for n, p in self._names.items():
            full = gather_experts(p) if is_expert_param(p) else p.data  # every rank of the stage, in the same order
            if first:
                mine[n] = full.detach().to("cpu", torch.float32).clone()
        if first:
            local = {id(m) for m in self.ds.module.modules()}
            for name, module in self.model.named_modules():
                if id(module) in local:
                    for b, buf in module.named_buffers(recurse=False):
                        if b not in module._non_persistent_buffers_set:
                            mine[f"{name}.{b}" if name else b] = buf.detach().to("cpu").clone()
        parts = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
        dist.gather_object(mine, parts, dst=0)
        if dist.get_rank() != 0:
            return None
        out: dict[str, torch.Tensor] = {}
        for part in parts:
            for name, tensor in part.items():
                out.setdefault(name, tensor)
        return out


@torch.no_grad()
def _drop_other_stages(model: Transformer, pipe: nn.Module) -> None:
    """Free the parameters of the other stages (moved to the meta device; buffers stay, they are small)."""
    local = {id(p) for p in pipe.parameters()}
    for module in model.modules():
        for name, p in list(module._parameters.items()):
            if p is not None and id(p) not in local and p.device.type != "meta":
                module._parameters[name] = nn.Parameter(p.to("meta"), requires_grad=p.requires_grad)
