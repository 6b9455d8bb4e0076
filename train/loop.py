"""The training loop: steps, periodic validation and checkpoints; parallelism lives in the engine it is handed."""

from __future__ import annotations

import math
import resource
import sys
import time
from pathlib import Path

import torch

from data_pipeline.loader import DistributedBatchLoader, PackedSequences, iter_eval_batches
from train import checkpoint
from train.callbacks import Callback
from train.config import PretrainConfig
from train.engine import Dist, all_reduce_mean, all_reduce_sum, all_reduce_sum_tensor, full_state_dict
from train.faults import FaultInjection, Heartbeat, NumericGuard, StepGate


def current_memory_gb(device: torch.device) -> float:
    """Memory in use now: GPU memory allocated, or on CPU the process's resident set size."""
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device) / 2**30
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**30


def peak_memory_gb(device: torch.device) -> float:
    """Peak GPU memory allocated, or on CPU the process's peak resident set size."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def base_optimizer(engine) -> torch.optim.Optimizer:
    """The torch optimizer under DeepSpeed's wrappers (ZeRO, bf16), whose `step` updates the parameters."""
    opt = engine.optimizer
    while not isinstance(opt, torch.optim.Optimizer):
        opt = opt.optimizer
    return opt


class ExtraStats:
    """Per-step MoE / MTP statistics from `model.last_stats`, and the balancing-bias update after the step.

    Routed-token counts are summed over micro-batches and all-reduced over the data-parallel ranks, so every rank
    applies the same bias update (the biases stay identical without being broadcast).
    """

    def __init__(self) -> None:
        self.loads: torch.Tensor | None = None
        self.sums: dict[str, float] = {}

    @staticmethod
    def active(module) -> bool:
        cfg = getattr(module, "cfg", None)
        return cfg is not None and (cfg.moe.enabled or cfg.mtp.depth > 0)

    def add(self, stats: dict) -> float:
        """Accumulate one micro-batch; returns its CE loss."""
        if "moe_loads" in stats:
            self.loads = stats["moe_loads"] if self.loads is None else self.loads + stats["moe_loads"]
        for key in ("mtp_loss", "aux_loss"):
            if key in stats:
                self.sums[key] = self.sums.get(key, 0.0) + stats[key].item()
        return stats["ce_loss"].item()

    def finish(self, module, gamma: float, n_micro: int, d: Dist, update: bool = True) -> dict:
        """After the optimizer step: update the biases (unless the step was skipped); metrics moe_max_violation,
        mtp_loss, aux_loss."""
        from model.moe import max_violation

        out: dict = {}
        if self.sums:
            keys = sorted(self.sums)
            for key, value in zip(keys, all_reduce_mean([self.sums[k] / n_micro for k in keys], d.device), strict=True):
                out[key] = value
        if self.loads is not None:
            loads = all_reduce_sum_tensor(self.loads)
            if update:
                module.update_balance(loads, gamma)
            out["moe_max_violation"] = max_violation(loads)
        return out


class Trainer:
    """Runs optimizer steps on a DeepSpeed engine; rank 0 reports through callbacks."""

    def __init__(
        self,
        cfg: PretrainConfig,
        d: Dist,
        engine,
        scheduler,
        loader: DistributedBatchLoader,
        val_data: PackedSequences | None,
        val_sources: dict[str, PackedSequences],
        callbacks: list[Callback],
        meta: dict,
        flops_per_token: float,
        peak_flops: float,
    ) -> None:
        self.cfg, self.d, self.engine, self.scheduler = cfg, d, engine, scheduler
        self.loader, self.val_data, self.val_sources = loader, val_data, val_sources
        self.callbacks, self.meta = callbacks, meta
        self.flops_per_token, self.peak_flops = flops_per_token, peak_flops
        self.ckpt_dir = Path(cfg.run.dir) / "checkpoints"
        self.step = 0
        self.base_mem_gb = 0.0  # memory in use before the model was built (framework overhead on CPU)
        self.elapsed = 0.0  # wall seconds of training before this launch (restored on resume)
        self._launch_start: float | None = None
        self.last_val_loss: float | None = None
        self.preemption = None  # a train.faults.PreemptionHandler, set by the entry point
        self.preempted = False
        spike = cfg.train.spike
        self.guard = NumericGuard(spike.window, spike.z_threshold, spike.max_consecutive)
        self.gate = StepGate(base_optimizer(engine), check_grads=cfg.deepspeed.zero_stage == 0)
        self.faults = FaultInjection(cfg.debug, d.rank, d.world_size, loader.global_batch)
        self.heartbeat = Heartbeat(cfg.deepspeed.timeout_minutes) if cfg.deepspeed.heartbeat else None

    def resume(self, tag: str) -> None:
        state = checkpoint.load(self.engine, self.ckpt_dir, tag)
        self.loader.load_state_dict(state["loader"])
        self.step = int(state["step"])
        self.elapsed = float(state.get("elapsed_s", 0.0))
        if "faults" in state:
            self.guard.load_state_dict(state["faults"])

    def rollback(self) -> None:
        """Back to the latest checkpoint after a run of spikes, keeping the spiking batches' positions so the loader
        steps over them; skip counters and wall time carry on."""
        tag = checkpoint.latest_tag(self.ckpt_dir, self.cfg.checkpoint.verify_hashes)
        streak = self.guard.consecutive
        if tag is None:
            if self.d.is_main:
                print(f"[faults] {streak} spikes in a row but no checkpoint to roll back to: going on",
                      file=sys.stderr, flush=True)  # fmt: skip
            self.guard.consecutive = 0
            return
        kept = self.guard.state_dict()
        elapsed, at = self._elapsed_now(), self.step
        self.resume(tag)
        self.guard.load_state_dict({**kept, "recent": self.guard.recent, "consecutive": 0,
                                    "rollbacks": kept["rollbacks"] + 1})  # fmt: skip
        self.elapsed, self._launch_start = elapsed, time.perf_counter()
        if self.d.is_main:
            print(f"[faults] step {at}: {streak} spikes in a row, rolled back to {tag}; skipping the batches at "
                  f"positions {kept['bad_positions']}", file=sys.stderr, flush=True)  # fmt: skip
        self.log({"rollback_from": at, **self.guard.metrics(), "elapsed_s": elapsed})

    def log(self, metrics: dict) -> None:
        if self.d.is_main:
            for cb in self.callbacks:
                cb.on_log(self.step, metrics)

    @torch.no_grad()
    def _mean_loss(self, data: PackedSequences, sequences: int) -> float | None:
        """Mean token loss on `sequences` validation sequences spread over `data` (always the same ones)."""
        per_rank = min(len(data), sequences) // self.d.world_size  # equal work on every rank (ZeRO-3 collectives)
        total, count = 0.0, 0
        for x, y in iter_eval_batches(
            data, self.cfg.train.micro_batch_size, per_rank * self.d.world_size, self.d.rank, self.d.world_size
        ):
            loss = self.engine(x.to(self.d.device), y.to(self.d.device))
            total += loss.item() * y.numel()
            count += y.numel()
        total, count = all_reduce_sum([total, count], self.d.device)
        return total / count if count else None

    def evaluate(self) -> dict[str, float]:
        """`val_loss` over the whole validation split, and `val_loss/SOURCE` over each source's held-out part."""
        if self.val_data is None:
            return {}
        t = self.cfg.train
        self.engine.eval()
        out = {"val_loss": self._mean_loss(self.val_data, t.eval_sequences)}
        if t.eval_per_source:
            share = max(self.d.world_size, t.eval_sequences // max(1, len(self.val_sources)))
            for name, data in self.val_sources.items():
                out[f"val_loss/{name}"] = self._mean_loss(data, share)
        self.engine.train()
        return {k: v for k, v in out.items() if v is not None}

    def _grad_norm(self) -> float:
        norm = self.engine.get_global_grad_norm()
        if norm is not None:
            return float(norm)
        return float("nan")

    def _stage0_grad_norm(self) -> float:
        grads = [p.grad for p in self.engine.module.parameters() if p.grad is not None]
        return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads])))

    def _elapsed_now(self) -> float:
        return self.elapsed + (time.perf_counter() - self._launch_start if self._launch_start else 0.0)

    def save(self) -> None:
        state = {"step": self.step, "loader": self.loader.state_dict(), "elapsed_s": self._elapsed_now(),
                 "faults": self.guard.state_dict()}  # fmt: skip
        weights = full_state_dict(self.engine)
        ck = self.cfg.checkpoint
        checkpoint.save(
            self.engine, self.ckpt_dir, self.step, state, self.meta, weights, ck.keep_last, ck.keep_every,
            self.cfg.debug.kill_during_save_at,
        )  # fmt: skip

    def fit(self) -> dict:
        """Train to `train.max_steps`; returns a summary (first/last validation loss, tokens/s)."""
        t, ck = self.cfg.train, self.cfg.checkpoint
        layout_tokens = self.loader.global_batch * t.seq_len
        first_val = None
        if t.eval_every and self.step == 0:
            val = self.evaluate()
            first_val = self.last_val_loss = val.get("val_loss")
            if val:
                self.log({**val, "tokens": 0, "elapsed_s": 0.0})
        zero0 = self.cfg.deepspeed.zero_stage == 0
        module = self.engine.module
        mcfg = self.cfg.model
        rates: list[float] = []
        self._launch_start = time.perf_counter()
        loss = math.nan
        stop_at = t.max_steps if t.exit_after_steps is None else min(t.max_steps, self.step + t.exit_after_steps)
        while self.step < stop_at:
            self.faults.before_step(self.step + 1)
            if self.heartbeat is not None:
                self.heartbeat.beat(self.step + 1)
            start = time.perf_counter()
            while self.loader.consumed in self.guard.bad_positions:  # batches that spiked before a rollback
                self.loader.consumed += self.loader.global_batch
            position = self.loader.consumed
            micro = self.loader.next_step()
            lr = self.engine.optimizer.param_groups[0]["lr"]
            progress = self.step / t.max_steps
            if mcfg.mtp.depth:
                module.mtp_weight = mcfg.mtp.weight_at(progress)
            loss_sum, grad_norm = 0.0, math.nan
            extra = ExtraStats()
            for i, (x, y) in enumerate(micro):
                out = self.engine(x.to(self.d.device), y.to(self.d.device))
                out, factor = self.faults.loss(out, self.step + 1, position)
                self.engine.backward(out)
                if zero0 and i == len(micro) - 1:
                    grad_norm = self._stage0_grad_norm()  # DeepSpeed does not report it without ZeRO
                # MoE / MTP models return CE + balance + MTP losses; `loss` stays the next-token CE everywhere.
                stats = getattr(module, "last_stats", {})
                loss_sum += extra.add(stats) * factor if extra.active(module) else out.item()
                if i < len(micro) - 1:
                    self.engine.step()  # DeepSpeed only accumulates here; the update comes at the last micro-batch
            # Every rank sees the same all-reduced loss, so every rank takes the same skip decision.
            (loss,) = all_reduce_mean([loss_sum / len(micro)], self.d.device)
            verdict = self.guard.verdict(loss)
            self.gate.veto, self.gate.applied = verdict is not None, False
            self.engine.step()
            self.gate.veto = False
            if verdict is None and not self.gate.applied:  # DeepSpeed's overflow check or the gate: non-finite grads
                verdict = "nonfinite"
            self.guard.record(verdict, loss, position)
            self.step += 1
            if self.scheduler is not None and self.scheduler.last_epoch < self.step:
                self.scheduler.step()  # a skipped update still advances the schedule: lr stays a function of step
            if not zero0:
                grad_norm = self._grad_norm()
            moe_metrics = extra.finish(module, mcfg.moe.gamma_at(progress), len(micro), self.d, verdict is None)
            elapsed = time.perf_counter() - start
            tokens_per_s = layout_tokens / elapsed
            rates.append(tokens_per_s)
            metrics = {
                "loss": loss,
                "lr": lr,
                "grad_norm": grad_norm,
                "tokens_per_s": tokens_per_s,
                "mfu": self.flops_per_token * tokens_per_s / (self.peak_flops * self.d.world_size),
                "tokens": self.loader.consumed * t.seq_len,
                "step_time_s": elapsed,
                "peak_mem_gb": peak_memory_gb(self.d.device),
                "base_mem_gb": self.base_mem_gb,
                **moe_metrics,
                **self.guard.metrics(),
            }
            if verdict is not None:
                metrics["skipped"] = verdict
                if self.d.is_main:
                    print(f"[faults] step {self.step}: {verdict} loss {loss:.4g} (grad norm {grad_norm:.4g}), "
                          "update skipped", file=sys.stderr, flush=True)  # fmt: skip
            last = self.step == t.max_steps
            if t.eval_every and (self.step % t.eval_every == 0 or last):
                metrics.update(self.evaluate())
                self.last_val_loss = metrics.get("val_loss")
            metrics["elapsed_s"] = self._elapsed_now()
            if self.step % self.cfg.logging.log_every == 0 or "val_loss" in metrics or last or verdict is not None:
                self.log(metrics)
            self.faults.after_step(self.step)
            if verdict == "spike" and self.guard.rollback_due:
                self.rollback()
                continue
            if self.cfg.debug.step_sleep_s:
                time.sleep(self.cfg.debug.step_sleep_s)
            preempted = self.preemption is not None and self.preemption.agreed(self.d.device)
            # While spikes are being skipped the weights may be what is wrong: no periodic save until one passes.
            periodic = ck.every_steps and self.step % ck.every_steps == 0 and self.guard.consecutive == 0
            if periodic or self.step == stop_at or preempted:
                self.save()
            if preempted:
                waited = self.preemption.seconds_since_signal()
                if self.d.is_main and waited is not None and waited > ck.preemption_grace_s:
                    print(f"[preemption] saving took {waited:.0f} s after the signal, more than "
                          f"checkpoint.preemption_grace_s={ck.preemption_grace_s:.0f}", file=sys.stderr)  # fmt: skip
                self.preempted = True
                break
        steady = rates[1:] or rates  # the first step pays for warm-up
        return {
            "steps": self.step,
            "loss": loss,
            "first_val_loss": first_val,
            "val_loss": self.last_val_loss,
            "tokens_per_s": sum(steady) / len(steady) if steady else None,
            "preempted": self.preempted,
        }
