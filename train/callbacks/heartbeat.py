"""Stalled ranks: before each step every rank checks in, so a rank that stops arriving is named."""

from __future__ import annotations

import re
import sys
from datetime import timedelta

import torch.distributed as dist

from train.callbacks.base import Callback


class Heartbeat(Callback):
    """Before each step every rank checks in on a gloo side group (`monitored_barrier`): a rank that does not
    arrive within the timeout is named in the error, instead of the job hanging in its next collective."""

    def __init__(self, timeout_minutes: float) -> None:
        self.minutes, self.timeout = timeout_minutes, timedelta(minutes=timeout_minutes)
        self.group = None
        if dist.is_initialized() and dist.get_world_size() > 1:
            self.group = dist.new_group(backend="gloo", timeout=self.timeout)  # also beside NCCL: gloo can name

    def beat(self, step: int) -> None:
        if self.group is None:
            return
        try:
            dist.monitored_barrier(self.group, timeout=self.timeout, wait_all_ranks=True)
        except RuntimeError as err:
            first = str(err).splitlines()[0]
            found = re.search(r"Ranks? ([\d, ]+) failed to pass", first)
            who = f"rank {found.group(1).strip()}" if found else "a rank"
            msg = (f"[hang] {who} did not reach step {step} within {self.timeout.total_seconds():g} s "
                   f"(deepspeed.timeout_minutes={self.minutes:g}): it is stalled or dead, see its log. "
                   f"The job stops instead of hanging. ({first})")  # fmt: skip
            print(msg, file=sys.stderr, flush=True)
            raise RuntimeError(msg) from err

    def pre_step(self, step: int) -> None:
        self.beat(step)
