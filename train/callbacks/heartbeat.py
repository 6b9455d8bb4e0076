"""Stalled ranks: before each step every rank checks in, so a rank that stops arriving is named."""

from __future__ import annotations

import re
import sys
from datetime import timedelta

from train.callbacks.base import Callback
from train.engine.distributed import CheckIn


class Heartbeat(Callback):
    """Before each step every rank checks in on a gloo side group (`monitored_barrier`): a rank that does not
    arrive within the timeout is named in the error, instead of the job hanging in its next collective."""

    def __init__(self, timeout_minutes: float) -> None:
        self.minutes, self.timeout = timeout_minutes, timedelta(minutes=timeout_minutes)
        self.check_in = CheckIn(self.timeout)

    def beat(self, step: int) -> None:
        try:
            self.check_in.arrive()
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
