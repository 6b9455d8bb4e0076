"""The DeepSpeed engine: its JSON config, our optimizer and schedule, and `Engine`, the one object the trainer
steps. With `train.engine.distributed` and `expert_parallel`, the only modules that talk to DeepSpeed's runtime."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

from model import accelerator
from model.output import ModelOutput
from train.config import DeepSpeedConfig, OptimConfig, TrainConfig
from train.engine.deepspeed_compat import gate_optimizer_step
from train.engine.distributed import Dist
from train.engine.expert_parallel import gather_experts, has_expert_params, is_expert_param, load_local_experts
from train.engine.model_parallel import (
    adopt_vocab_parallel_head,
    init_tensor_parallel,
    prepare_tensor_parallel,
    tensor_parallel_config,
)
from train.engine.schedules import lr_multiplier

if TYPE_CHECKING:
    from train.trainer.layout import BatchLayout


def resolve_dtype(train: TrainConfig, device: torch.device) -> torch.dtype:
    if train.dtype == "auto":
        return accelerator.default_dtype(device)
    return torch.bfloat16 if train.dtype == "bf16" else torch.float32


def deepspeed_config(
    ds: DeepSpeedConfig,
    optim: OptimConfig,
    layout: BatchLayout,
    dtype: torch.dtype,
    load_universal: bool = False,
    tp_size: int = 1,
    sp_size: int = 1,
) -> dict:
    """The DeepSpeed JSON config; the optimizer and scheduler are built by us and passed in as objects.

    `load_universal`: the checkpoint to resume is read in DeepSpeed's universal format (resharded to this job).
    `tp_size` > 1: AutoTP (train/engine/model_parallel.py). `sp_size` > 1: DeepSpeed is not told about Ulysses, so
    it counts the sequence-parallel ranks as data-parallel ones (their gradients are averaged like theirs)."""
    zero: dict = {
        "stage": ds.zero_stage,
        "overlap_comm": ds.overlap_comm,
        "contiguous_gradients": ds.contiguous_gradients,
        "reduce_bucket_size": ds.reduce_bucket_size,
        "allgather_bucket_size": ds.allgather_bucket_size,
    }
    if ds.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": accelerator.has_accelerator()}
    if ds.offload_param:
        zero["offload_param"] = {"device": "cpu", "pin_memory": accelerator.has_accelerator()}
    config = {
        "train_batch_size": layout.global_batch_seqs * sp_size,
        "train_micro_batch_size_per_gpu": layout.micro_batch_size,
        "gradient_accumulation_steps": layout.grad_accum,
        "gradient_clipping": optim.grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": dtype == torch.bfloat16},
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "checkpoint": {"load_universal": load_universal},
    }
    if tp_size > 1:
        config["tensor_parallel"] = tensor_parallel_config(tp_size)
    return config


def build_optimizer(model: torch.nn.Module, optim: OptimConfig, ds: DeepSpeedConfig, device: torch.device):
    """AdamW with weight decay on matrices only; DeepSpeed's CPU Adam when optimizer states live on the CPU.
    optim.name=muon: Muon for the hidden matrices, AdamW for the rest (train/engine/muon.py)."""
    if optim.name == "muon":
        from train.engine.muon import build_muon_optimizer

        return build_muon_optimizer(model, optim, device)
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            # A parameter built partitioned (zero.Init, init.from_hf under ZeRO-3) is an empty 1-D tensor: its
            # real shape is ds_shape.
            (decay if len(getattr(p, "ds_shape", p.shape)) >= 2 else no_decay).append(p)
    groups = [
        {"name": "decay", "params": decay, "weight_decay": optim.weight_decay},
        {"name": "no_decay", "params": no_decay, "weight_decay": 0.0},
    ]
    if any(getattr(p, "allreduce", True) is False for p in decay):
        from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer

        # Expert-parallel weights go to their own groups (`moe: True`), which ZeRO partitions over the expert
        # data-parallel group instead of all ranks (train/expert_parallel.py).
        groups = split_params_into_different_moe_groups_for_optimizer(groups)
    kwargs = {"lr": optim.lr, "betas": (optim.beta1, optim.beta2), "eps": optim.eps}
    if ds.offload_optimizer:
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(groups, adamw_mode=True, **kwargs)
    return torch.optim.AdamW(groups, fused=accelerator.is_accelerator(device), **kwargs)


def build_engine(
    model,
    cfg_train: TrainConfig,
    optim: OptimConfig,
    ds: DeepSpeedConfig,
    layout: BatchLayout,
    d: Dist,
    load_universal: bool = False,
    tp_size: int = 1,
    sp_size: int = 1,
    pp_size: int = 1,
):
    """Wrap the model with DeepSpeed; returns (DeepSpeed engine, optimizer, scheduler). With pp_size > 1 the
    engine is DeepSpeed's PipelineEngine over this rank's stage of `model` (train/engine/pipeline.py)."""
    import deepspeed

    dtype = resolve_dtype(cfg_train, d.device)
    model.to(d.device)
    mpu = None
    if tp_size > 1:
        mpu = init_tensor_parallel(tp_size)
        prepare_tensor_parallel(model)
    if pp_size > 1:
        from train.engine.pipeline import build_pipeline

        model = build_pipeline(model, pp_size)  # DeepSpeed takes its process groups (mpu) from the module
    optimizer = build_optimizer(model, optim, ds, d.device)
    schedule = lr_multiplier(
        optim.schedule, optim.warmup_steps, cfg_train.max_steps, optim.min_lr_ratio, optim.decay_fraction
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    engine, optimizer, _, scheduler = deepspeed.initialize(
        model=model,
        optimizer=optimizer,
        lr_scheduler=scheduler,
        config=deepspeed_config(ds, optim, layout, dtype, load_universal, tp_size, sp_size),
        mpu=mpu,
    )
    if tp_size > 1:
        adopt_vocab_parallel_head(engine.module)
    if optim.name == "muon":
        from train.engine.deepspeed_compat import tensor_parallel_shards, zero_flat_layouts

        # Newton-Schulz needs whole matrices: where ZeRO's partitions and AutoTP's slices put their pieces.
        if ds.zero_stage > 0:
            base_optimizer(engine).bind(zero_flat_layouts(engine))
        if tp_size > 1:
            base_optimizer(engine).bind_tensor_parallel(tensor_parallel_shards(engine.module))
    return engine, optimizer, scheduler


def full_state_dict(engine) -> dict[str, torch.Tensor] | None:
    """Gather full fp32 weights onto rank 0 (collective: every rank must call it); other ranks get None.

    One module at a time (bounded memory): ZeRO-3 partitions are gathered, then tensor-parallel shards (AutoTP),
    then expert-parallel ones from their expert-parallel group, so the result is the same as a single-rank run's
    whatever the layout (all experts in global order, whole vocabulary)."""
    import deepspeed
    from deepspeed.module_inject.layers import GatherReplacedLayerParams

    module = engine.module
    main = dist.get_rank() == 0
    names = {id(p): n for n, p in module.named_parameters()}  # named_parameters skips tied duplicates
    out: dict[str, torch.Tensor] = {}
    for mod in module.modules():
        params = list(mod.parameters(recurse=False))
        if not params:
            continue
        zero3 = any(hasattr(p, "ds_id") for p in params)
        with deepspeed.zero.GatheredParameters(params, modifier_rank=None, enabled=zero3):
            with GatherReplacedLayerParams(params, mod, enabled=True):
                for p in params:
                    full = gather_experts(p) if is_expert_param(p) else p.data
                    name = names.get(id(p))
                    if main and name is not None and name not in out:
                        out[name] = full.detach().to("cpu", torch.float32).clone()
    persistent = module.state_dict().keys() if main else ()
    for name, buf in module.named_buffers(remove_duplicate=True):
        if name in persistent:
            out[name] = buf.detach().to("cpu").clone()
    return out if main else None


@torch.no_grad()
def load_persistent_buffers(module: torch.nn.Module, weights: str) -> None:
    """Copy every persistent buffer of `module` from `weights` (a checkpoint's model.safetensors)."""
    from safetensors import safe_open

    with safe_open(weights, framework="pt") as f:
        for prefix, mod in module.named_modules():
            for name, buf in mod.named_buffers(recurse=False):
                if name not in mod._non_persistent_buffers_set:
                    buf.copy_(f.get_tensor(f"{prefix}.{name}" if prefix else name).to(buf))


def base_optimizer(engine) -> torch.optim.Optimizer:
    """The torch optimizer under DeepSpeed's wrappers (ZeRO, bf16), whose `step` updates the parameters."""
    opt = engine.optimizer
    while not isinstance(opt, torch.optim.Optimizer):
        opt = opt.optimizer
    return opt


class Engine:
    """What the trainer steps: forward and backward of micro-batches, an optimizer step it may veto, the gradient
    norm, the learning-rate schedule. ZeRO-stage differences stay in here.

    DeepSpeed skips non-finite gradients itself under ZeRO 1-3 and bf16 (its overflow check); plain fp32 data
    parallelism (ZeRO-0) calls torch's AdamW directly, so there every gradient is tested (agreed across ranks)
    before the update. `step()` says whether the update really ran.
    """

    def __init__(
        self, ds_engine, scheduler, zero_stage: int, dp_rank: int = 0, dp_size: int = 1, seq_shards: int = 1
    ) -> None:
        self.ds, self.scheduler = ds_engine, scheduler
        self.dp_rank, self.dp_size = dp_rank, dp_size
        """Which batch this rank reads, of how many: ranks of one tensor- or sequence-parallel group read the same."""
        self.seq_shards = seq_shards
        """Sequence-parallel degree: the model's losses are each rank's share of its sequences' (they add up)."""
        self.zero0 = zero_stage == 0
        self.optimizer = base_optimizer(ds_engine)
        self._veto = self._applied = False
        self._grad_norm = math.nan
        self._inner_step = gate_optimizer_step(self.optimizer, self._gated_step)

    @property
    def module(self) -> torch.nn.Module:
        return self.ds.module

    @property
    def lr(self) -> float:
        return self.ds.optimizer.param_groups[0]["lr"]

    @property
    def grad_norm(self) -> float:
        """Global gradient norm of the last step (before clipping); nan when DeepSpeed did not compute one."""
        return self._grad_norm

    def train(self) -> None:
        self.ds.train()

    def eval(self) -> None:
        self.ds.eval()

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> ModelOutput:
        return self.ds(x, y)

    def train_batch(self, micro: list, loss_fn: Callable[[ModelOutput], torch.Tensor], decide: Callable[[], bool]):
        """Forward and backward of each micro-batch (x, y) with `loss_fn(output)`, then the optimizer step unless
        `decide()` (called once, by every rank, after the last backward) vetoes it; returns whether it ran."""
        device = self.ds.device
        for i, (x, y) in enumerate(micro):
            out = self.forward(x.to(device), y.to(device))
            self.backward(loss_fn(out), last=i == len(micro) - 1)
        return self.step(veto=decide())

    def eval_loss(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """This rank's mean CE on one evaluation micro-batch (eval mode, no gradient)."""
        return self.forward(x, y).ce_loss

    def backward(self, loss: torch.Tensor, last: bool) -> None:
        """Backward of one micro-batch; DeepSpeed accumulates until the `last` one of the step."""
        self.ds.backward(loss)
        if last:
            if self.zero0:
                self._grad_norm = self._local_grad_norm()  # DeepSpeed does not report it without ZeRO
        else:
            self.ds.step()  # only counts the micro-batch: the update comes at the last one

    def step(self, veto: bool = False) -> bool:
        """The optimizer step at the end of the batch; returns whether the update ran (not vetoed, gradients
        finite). The schedule is advanced separately (`advance_schedule`), skipped step or not."""
        self._veto, self._applied = veto, False
        self.ds.step()
        self._veto = False
        if not self.zero0:
            norm = self.ds.get_global_grad_norm()
            self._grad_norm = float(norm) if norm is not None else math.nan
        return self._applied

    def advance_schedule(self, step: int) -> None:
        """Learning rate as a function of the step count: a skipped update still advances the schedule."""
        if self.scheduler is not None and self.scheduler.last_epoch < step:
            self.scheduler.step()

    def _local_grad_norm(self) -> float:
        grads = [p.grad for p in self.module.parameters() if p.grad is not None]
        return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads])))

    def _grads_finite(self) -> bool:
        grads = [p.grad for group in self.optimizer.param_groups for p in group["params"] if p.grad is not None]
        device = grads[0].device if grads else None
        ok = torch.stack([torch.isfinite(g).all() for g in grads]).all() if grads else torch.tensor(True)
        flag = (~ok).to(device=device, dtype=torch.float32).reshape(1)  # one host sync, after the all-reduce
        if dist.is_initialized():
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return not bool(flag.item())

    def _gated_step(self, *args, **kwargs):
        if self._veto or (self.zero0 and not self._grads_finite()):
            return None
        self._applied = True
        return self._inner_step(*args, **kwargs)

    def full_state_dict(self) -> dict[str, torch.Tensor] | None:
        return full_state_dict(self.ds)

    def after_load(self, tag_dir: Path) -> None:
        """After DeepSpeed restored checkpoint `tag_dir`: whatever it leaves out (expert-parallel slices: see
        `load_local_experts`; the persistent buffers after a universal load, such as the MoE routers' balancing
        biases, which it never reads: the universal format holds optimizer-managed parameters only)."""
        weights = str(tag_dir / "model.safetensors")
        if has_expert_params(self.module):
            load_local_experts(self.module, weights)
        if self.ds.load_universal_checkpoint():
            load_persistent_buffers(self.module, weights)
