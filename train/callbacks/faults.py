"""Fault injection for tests (the `debug` block), registered only when one of its settings is used.

Kills and stalls fire on the first attempt only (TORCHELASTIC_RESTART_COUNT = 0), so a restarted job recovers.
"""

from __future__ import annotations

import contextlib
import math
import os
import signal
import sys
import time
from pathlib import Path

import torch

from model.output import ModelOutput
from train.callbacks.base import Callback
from train.config import DebugConfig


def active(debug: DebugConfig) -> bool:
    """Whether any fault is configured (otherwise the component is not registered at all)."""
    return debug != DebugConfig()


class _InfGrad(torch.autograd.Function):
    """Identity forward; backward sends infinite gradients (fault injection: finite loss, non-finite grads)."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * math.inf


class FaultInjection(Callback):
    """The `debug` block's faults: stalls, kills, NaN / spiking losses and infinite gradients, and a sleep after
    every step. Loss faults go through a forward hook on the model, so the training step has no fault code."""

    def __init__(self, debug: DebugConfig, rank: int, world_size: int, global_batch: int) -> None:
        self.cfg, self.rank, self.world_size = debug, rank, world_size
        self.first_attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0"
        # spike_at_steps name steps of an uninterrupted run; the batch of step s starts at position (s-1) * batch.
        self.spike_positions = {(s - 1) * global_batch for s in debug.spike_at_steps}
        self.step = 0

    def _mine(self, rank_step: list[int], step: int) -> bool:
        return self.first_attempt and bool(rank_step) and list(rank_step) == [self.rank, step]

    def pre_train(self) -> None:
        self.trainer.engine.module.register_forward_hook(self._scale_losses)

    def pre_step(self, step: int) -> None:
        self.step = step
        if self._mine(self.cfg.stall_rank_at_step, step):
            print(f"[debug] rank {self.rank} stalls before step {step}", file=sys.stderr, flush=True)
            signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a hung rank does not checkpoint on SIGTERM
            while True:
                time.sleep(3600)

    def step_end(self, step: int) -> None:
        if self._mine(self.cfg.kill_rank_at_step, step):
            print(f"[debug] rank {self.rank} SIGKILLs itself after step {step}", file=sys.stderr, flush=True)
            os.kill(os.getpid(), signal.SIGKILL)
        if self.cfg.step_sleep_s:
            time.sleep(self.cfg.step_sleep_s)

    def _scale_losses(self, module, args, out: ModelOutput) -> ModelOutput | None:
        """Training forwards only: every loss term times the step's factor (NaN, or `spike_factor` for the batches
        of `spike_at_steps`), and infinite gradients behind the CE loss on the last rank for `inf_grad_at_steps`."""
        if not module.training or out.ce_loss is None:
            return None
        factor = 1.0
        if self.step in self.cfg.nan_loss_at_steps:
            factor = math.nan
        elif self.trainer.position in self.spike_positions:
            factor = self.cfg.spike_factor
        if factor != 1.0:
            out = out._replace(**{k: getattr(out, k) * factor for k in ("ce_loss", "aux_losses", "mtp_losses")
                                  if getattr(out, k) is not None})  # fmt: skip
        if self.step in self.cfg.inf_grad_at_steps and self.rank == self.world_size - 1:
            out = out._replace(ce_loss=_InfGrad.apply(out.ce_loss))
        return out


class KillDuringSave:
    """Counts rank 0's file operations over the saves of this launch; the N-th (`debug.kill_during_save_at`) is
    preceded by a kill -9 of the whole job. Without a kill point it only counts (`done`), which tests read to walk N
    over every operation of a save."""

    def __init__(self, kill_at: int | None) -> None:
        self.kill_at, self.done = kill_at, 0

    def __call__(self, what: str) -> None:
        self.done += 1
        if os.environ.get("HANGANG_DEBUG_FILE_OPS"):
            print(f"[debug] file operation {self.done}: {what}", file=sys.stderr, flush=True)
        if self.kill_at is not None and self.done == self.kill_at:
            print(f"[debug] kill -9 before file operation {self.kill_at} of this launch's saves ({what})",
                  file=sys.stderr, flush=True)  # fmt: skip
            kill_job()


def kill_job() -> None:
    """SIGKILL this process and, under torchrun, the agent and every other local rank (a node losing power)."""
    if "TORCHELASTIC_RUN_ID" in os.environ:
        agent, me = os.getppid(), os.getpid()
        siblings = []
        for stat in Path("/proc").glob("[0-9]*/stat"):
            with contextlib.suppress(OSError, ValueError, IndexError):
                fields = stat.read_text().rsplit(")", 1)[1].split()
                if int(fields[1]) == agent and int(stat.parent.name) != me:
                    siblings.append(int(stat.parent.name))
        for pid in [agent, *siblings]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    os.kill(os.getpid(), signal.SIGKILL)
