"""This process's place in the job, the process group, and the few collectives the trainer uses."""

from __future__ import annotations

import logging
import os
import socket
import warnings
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from model import accelerator
from train.config import DeepSpeedConfig


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
    import deepspeed

    for key, default in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_WORLD_SIZE", "1")):
        os.environ.setdefault(key, default)
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    if "MASTER_PORT" not in os.environ:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            os.environ["MASTER_PORT"] = str(s.getsockname()[1])
    local_rank = int(os.environ["LOCAL_RANK"])
    device = accelerator.local_device(local_rank)
    backend = ds.backend if ds.backend != "auto" else accelerator.comm_backend(device)
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
        device=device,
    )


def all_reduce_mean(values: list[float] | torch.Tensor, device: torch.device) -> list[float]:
    """Mean over ranks of a few numbers, in float64 (one collective, one host sync)."""
    t = torch.as_tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return (t / dist.get_world_size()).tolist()


def all_reduce_sum(values: list[float] | torch.Tensor, device: torch.device) -> list[float]:
    t = torch.as_tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def all_reduce_sum_tensor(t: torch.Tensor) -> torch.Tensor:
    """Sum of a tensor over all ranks (a copy; the input is left alone)."""
    t = t.detach().clone()
    dist.all_reduce(t)
    return t


def all_reduce_max_flag(flag: bool, device: torch.device) -> bool:
    """True on every rank when it is true on any."""
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    if dist.is_initialized():
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def all_gather_object(obj) -> list:
    """Every rank's `obj`, in rank order (pickled; for small metadata only)."""
    out: list = [None] * world_size()
    if dist.is_initialized():
        dist.all_gather_object(out, obj)
    else:
        out[0] = obj
    return out


class CheckIn:
    """A barrier on a gloo side group that names the ranks that did not arrive within `timeout` (`arrive()` raises
    RuntimeError with torch's message), instead of hanging in the next collective. Gloo also works beside NCCL."""

    def __init__(self, timeout: timedelta) -> None:
        self.timeout = timeout
        self.group = None
        if dist.is_initialized() and dist.get_world_size() > 1:
            self.group = dist.new_group(backend="gloo", timeout=timeout)

    def arrive(self) -> None:
        if self.group is not None:
            dist.monitored_barrier(self.group, timeout=self.timeout, wait_all_ranks=True)


def shutdown() -> None:
    """Leave the process group (if any) so that torchrun sees a clean exit."""
    if dist.is_initialized():
        dist.destroy_process_group()
