"""Faults a long run survives: preemption signals, stalled ranks, non-finite and spiking losses; debug injection.

A signal (SLURM's `--signal`, a scheduler's SIGTERM) becomes a clean stop with a checkpoint; a heartbeat names a rank
that stops arriving; a guard skips updates whose loss is not finite or spikes, and asks for a rollback after a run of
spikes. Rank failures themselves are handled by `torchrun --max-restarts` and resuming from the latest checkpoint.
"""

from __future__ import annotations

import math
import os
import re
import signal
import sys
import time

import torch
import torch.distributed as dist


class PreemptionHandler:
    """Records SIGTERM/SIGUSR1 (configurable); the loop then finishes its step, saves and exits.

    Ranks may receive the signal at different moments, so `agreed()` all-reduces the flag: every rank stops after
    the same step, and the checkpoint is written by all of them together.
    """

    def __init__(self, names: list[str]) -> None:
        self.received_at: float | None = None
        self.signal_name: str | None = None
        for name in names:
            sig = getattr(signal, name, None)
            if sig is None:
                raise ValueError(f"checkpoint.preemption_signals: unknown signal {name!r} (e.g. SIGTERM, SIGUSR1)")
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        if self.received_at is None:
            self.received_at = time.monotonic()
            self.signal_name = signal.Signals(signum).name
            print(f"[preemption] {self.signal_name}: saving after this step, then exiting", file=sys.stderr, flush=True)

    def agreed(self, device: torch.device) -> bool:
        """True on every rank as soon as any rank has received a signal (one tiny all-reduce per step)."""
        flag = torch.tensor([1.0 if self.received_at is not None else 0.0], device=device)
        if dist.is_initialized():
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    def seconds_since_signal(self) -> float | None:
        return None if self.received_at is None else time.monotonic() - self.received_at


class NumericGuard:
    """Decides, from the step's loss (all-reduced, so every rank decides alike), whether its update is skipped.

    Non-finite losses are skipped; so are spikes: a robust z-score (loss - median) / (1.4826 * MAD) over the last
    `window` accepted losses above `z_threshold`. `rollback_due` turns true after `max_consecutive` spikes in a row.
    Each spiking batch's data position is remembered so that a rollback can step over it.
    """

    def __init__(self, window: int, z_threshold: float, max_consecutive: int) -> None:
        self.window, self.z_threshold, self.max_consecutive = window, z_threshold, max_consecutive
        self.recent: list[float] = []
        self.consecutive = 0
        self.skipped_nonfinite = 0
        self.skipped_spike = 0
        self.rollbacks = 0
        self.bad_positions: list[int] = []

    def zscore(self, loss: float) -> float | None:
        """Robust z-score of `loss` against the window; None until the window is full."""
        if not self.window or len(self.recent) < self.window:
            return None
        values = torch.tensor(self.recent, dtype=torch.float64)
        median = values.median().item()  # lower median: exact and identical on every rank
        mad = (values - median).abs().median().item()
        scale = max(1.4826 * mad, 1e-6 * abs(median), 1e-12)  # a flat window must not divide by zero
        return (loss - median) / scale

    def verdict(self, loss: float) -> str | None:
        """'nonfinite', 'spike' or None (the update may go ahead); changes nothing."""
        if not math.isfinite(loss):
            return "nonfinite"
        z = self.zscore(loss)
        return "spike" if z is not None and z > self.z_threshold else None

    def record(self, verdict: str | None, loss: float, position: int) -> None:
        """After the step: count a skip (and remember a spike's data position) or add the loss to the window."""
        if verdict == "nonfinite":
            self.skipped_nonfinite += 1
        elif verdict == "spike":
            self.skipped_spike += 1
            self.consecutive += 1
            self.bad_positions.append(position)
        else:
            self.consecutive = 0
            if self.window:
                self.recent = (self.recent + [loss])[-self.window :]

    @property
    def rollback_due(self) -> bool:
        return self.consecutive >= self.max_consecutive

    def metrics(self) -> dict:
        return {"skipped_nonfinite": self.skipped_nonfinite, "skipped_spike": self.skipped_spike,
                "rollbacks": self.rollbacks}  # fmt: skip

    def state_dict(self) -> dict:
        """Saved: the window of accepted losses, the current spike streak, the skip counters and bad positions."""
        return {"recent": list(self.recent), "consecutive": self.consecutive, **self.metrics(),
                "bad_positions": list(self.bad_positions)}  # fmt: skip

    def load_state_dict(self, state: dict) -> None:
        self.recent = [float(v) for v in state["recent"]][-self.window :] if self.window else []
        self.consecutive = int(state["consecutive"])
        self.skipped_nonfinite = int(state["skipped_nonfinite"])
        self.skipped_spike = int(state["skipped_spike"])
        self.rollbacks = int(state["rollbacks"])
        self.bad_positions = [int(p) for p in state["bad_positions"]]


class StepGate:
    """Wraps the base optimizer's `step` so the loop can veto an update (parameters and Adam moments untouched).

    DeepSpeed skips non-finite gradients itself under ZeRO 1-3 and bf16 (its overflow check); plain fp32 data
    parallelism (ZeRO-0) calls torch's AdamW directly, so there `check_grads` makes the gate test every gradient
    and agree across ranks. `applied` says whether the last boundary's update really ran.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, check_grads: bool) -> None:
        self.optimizer, self.check_grads = optimizer, check_grads
        self.veto = False
        self.applied = False
        self._inner = optimizer.step

        def step(*args, **kwargs):
            return self._step(*args, **kwargs)

        step._wrapped_by_lr_sched = True  # wraps the scheduler's own wrapper, which still runs on every update
        optimizer.step = step  # instance attribute: DeepSpeed calls `self.optimizer.step()`

    def _grads_finite(self) -> bool:
        grads = [p.grad for group in self.optimizer.param_groups for p in group["params"] if p.grad is not None]
        device = grads[0].device if grads else None
        ok = torch.stack([torch.isfinite(g).all() for g in grads]).all() if grads else torch.tensor(True)
        flag = (~ok).to(device=device, dtype=torch.float32).reshape(1)  # one host sync, after the all-reduce
        if dist.is_initialized():
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return not bool(flag.item())

    def _step(self, *args, **kwargs):
        if self.veto or (self.check_grads and not self._grads_finite()):
            return None
        self.applied = True
        return self._inner(*args, **kwargs)


class _InfGrad(torch.autograd.Function):
    """Identity forward; backward sends infinite gradients (fault injection: finite loss, non-finite grads)."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * math.inf


class FaultInjection:
    """The `debug` block's faults, applied by the loop; every hook is a no-op with the default config.

    Kills and stalls fire on the first attempt only (TORCHELASTIC_RESTART_COUNT = 0), so a restarted job recovers.
    """

    def __init__(self, debug, rank: int, world_size: int, global_batch: int) -> None:
        self.cfg, self.rank, self.world_size = debug, rank, world_size
        self.first_attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0"
        # spike_at_steps name steps of an uninterrupted run; the batch of step s starts at position (s-1) * batch.
        self.spike_positions = {(s - 1) * global_batch for s in debug.spike_at_steps}

    def _mine(self, rank_step: list[int], step: int) -> bool:
        return self.first_attempt and bool(rank_step) and list(rank_step) == [self.rank, step]

    def before_step(self, step: int) -> None:
        if self._mine(self.cfg.stall_rank_at_step, step):
            print(f"[debug] rank {self.rank} stalls before step {step}", file=sys.stderr, flush=True)
            signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a hung rank does not checkpoint on SIGTERM
            while True:
                time.sleep(3600)

    def after_step(self, step: int) -> None:
        if self._mine(self.cfg.kill_rank_at_step, step):
            print(f"[debug] rank {self.rank} SIGKILLs itself after step {step}", file=sys.stderr, flush=True)
            os.kill(os.getpid(), signal.SIGKILL)

    def loss(self, out: torch.Tensor, step: int, position: int) -> tuple[torch.Tensor, float]:
        """The micro-batch loss with any injected fault, and the factor applied (to scale reported values)."""
        factor = 1.0
        if step in self.cfg.nan_loss_at_steps:
            factor = math.nan
        elif position in self.spike_positions:
            factor = self.cfg.spike_factor
        if factor != 1.0:
            out = out * factor
        if step in self.cfg.inf_grad_at_steps and self.rank == self.world_size - 1:
            out = _InfGrad.apply(out)
        return out, factor


class Heartbeat:
    """Before each step every rank checks in on a gloo side group (`monitored_barrier`): a rank that does not
    arrive within the timeout is named in the error, instead of the job hanging in its next collective."""

    def __init__(self, timeout_minutes: float) -> None:
        from datetime import timedelta

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
