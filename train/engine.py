"""Distributed setup and the DeepSpeed engine: the only place that knows about process groups and ZeRO."""

from __future__ import annotations

import logging
import os
import warnings
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from train.config import DeepSpeedConfig, OptimConfig, TrainConfig
from train.layout import BatchLayout
from train.schedules import lr_multiplier


@dataclass(frozen=True)
class Dist:
    """This process's place in the job."""

    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_distributed(ds: DeepSpeedConfig) -> Dist:
    """Join the torchrun job (or start a 1-process one when launched with plain python)."""
    for key, default in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_WORLD_SIZE", "1")):
        os.environ.setdefault(key, default)
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    if "MASTER_PORT" not in os.environ:
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            os.environ["MASTER_PORT"] = str(s.getsockname()[1])
    local_rank = int(os.environ["LOCAL_RANK"])
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(local_rank)
    backend = ds.backend if ds.backend != "auto" else ("nccl" if cuda else "gloo")
    import deepspeed

    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    # DeepSpeed still calls torch's deprecated all_gather_into_tensor once per step; the warning is noise to users.
    warnings.filterwarnings("ignore", message=".*all_gather_into_tensor.*", category=FutureWarning)
    timeout = timedelta(minutes=ds.timeout_minutes)
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True" and not dist.is_initialized():
        # torchrun's workers share the agent's TCPStore across restarts (--max-restarts): without a per-attempt
        # namespace a restarted rank can read a dead rank's address from the previous attempt and fail to connect.
        store = dist.TCPStore(
            os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False, timeout=timeout
        )
        store = dist.PrefixStore(f"hangang/attempt_{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        dist.init_process_group(backend, store=store, rank=rank, world_size=world, timeout=timeout)
    deepspeed.init_distributed(dist_backend=backend, timeout=timeout, verbose=False)  # joins the group made above
    return Dist(
        rank=dist.get_rank(),
        world_size=dist.get_world_size(),
        local_rank=local_rank,
        local_world_size=int(os.environ["LOCAL_WORLD_SIZE"]),
        device=torch.device("cuda", local_rank) if cuda else torch.device("cpu"),
    )


def resolve_dtype(train: TrainConfig, device: torch.device) -> torch.dtype:
    if train.dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return torch.bfloat16 if train.dtype == "bf16" else torch.float32


def deepspeed_config(
    ds: DeepSpeedConfig, optim: OptimConfig, layout: BatchLayout, dtype: torch.dtype, load_universal: bool = False
) -> dict:
    """The DeepSpeed JSON config; the optimizer and scheduler are built by us and passed in as objects.

    `load_universal`: the checkpoint to resume is read in DeepSpeed's universal format (resharded to this job)."""
    zero: dict = {
        "stage": ds.zero_stage,
        "overlap_comm": ds.overlap_comm,
        "contiguous_gradients": ds.contiguous_gradients,
        "reduce_bucket_size": ds.reduce_bucket_size,
        "allgather_bucket_size": ds.allgather_bucket_size,
    }
    if ds.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    if ds.offload_param:
        zero["offload_param"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    return {
        "train_batch_size": layout.global_batch_seqs,
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


def build_optimizer(model: torch.nn.Module, optim: OptimConfig, ds: DeepSpeedConfig, device: torch.device):
    """AdamW with weight decay on matrices only; DeepSpeed's CPU Adam when optimizer states live on the CPU."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
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
    return torch.optim.AdamW(groups, fused=device.type == "cuda", **kwargs)


def build_engine(
    model,
    cfg_train: TrainConfig,
    optim: OptimConfig,
    ds: DeepSpeedConfig,
    layout: BatchLayout,
    d: Dist,
    load_universal: bool = False,
):
    """Wrap the model with DeepSpeed; returns (engine, optimizer, scheduler)."""
    import deepspeed

    dtype = resolve_dtype(cfg_train, d.device)
    model.to(d.device)
    optimizer = build_optimizer(model, optim, ds, d.device)
    schedule = lr_multiplier(
        optim.schedule, optim.warmup_steps, cfg_train.max_steps, optim.min_lr_ratio, optim.decay_fraction
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    engine, optimizer, _, scheduler = deepspeed.initialize(
        model=model,
        optimizer=optimizer,
        lr_scheduler=scheduler,
        config=deepspeed_config(ds, optim, layout, dtype, load_universal),
    )
    return engine, optimizer, scheduler


def full_state_dict(engine) -> dict[str, torch.Tensor] | None:
    """Gather full fp32 weights onto rank 0 (collective: every rank must call it); other ranks get None.

    Expert-parallel weights are gathered from their expert-parallel group, so the result is the same as an
    ep_size=1 run's (all experts, global order)."""
    import deepspeed

    from train.expert_parallel import gather_experts, is_expert_param

    module = engine.module
    out: dict[str, torch.Tensor] = {}
    for name, param in module.named_parameters():  # named_parameters skips tied duplicates
        if is_expert_param(param):
            with deepspeed.zero.GatheredParameters([param], enabled=hasattr(param, "ds_id")):
                full = gather_experts(param)
            if dist.get_rank() == 0:
                out[name] = full.to("cpu", torch.float32).clone()
        elif hasattr(param, "ds_id"):  # ZeRO-3 partitioned: gather one parameter at a time to bound memory
            with deepspeed.zero.GatheredParameters([param], modifier_rank=None):
                if dist.get_rank() == 0:
                    out[name] = param.detach().to("cpu", torch.float32).clone()
        elif dist.get_rank() == 0:
            out[name] = param.detach().to("cpu", torch.float32).clone()
    for name, buf in module.named_buffers(remove_duplicate=True):
        if dist.get_rank() == 0 and name in module.state_dict():
            out[name] = buf.detach().to("cpu").clone()
    return out if dist.get_rank() == 0 else None


def all_reduce_mean(values: list[float], device: torch.device) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return (t / dist.get_world_size()).tolist()


def all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def all_reduce_sum_tensor(t: torch.Tensor) -> torch.Tensor:
    """Sum of a tensor over all ranks (a copy; the input is left alone)."""
    t = t.detach().clone()
    dist.all_reduce(t)
    return t
