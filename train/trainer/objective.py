"""The training objective: the model's typed output -> the loss to differentiate, and the step's loss figures.

total = CE + lambda(progress) * mean MTP loss + alpha * sum of the MoE layers' balance losses (DeepSeek-V3), with
lambda on the `train.mtp` schedule and alpha from `train.moe`. The parts are accumulated as tensors and read back
once per step, after one all-reduce (no host sync per micro-batch).
"""

from __future__ import annotations

import torch

from model.output import ModelOutput
from train.config import BalanceConfig, MTPWeightConfig
from train.engine.distributed import all_gather_object, all_reduce_mean, all_reduce_sum_tensor


class Objective:
    def __init__(self, balance: BalanceConfig, mtp: MTPWeightConfig, device: torch.device, seq_shards: int = 1,
                 pipeline: bool = False) -> None:  # fmt: skip
        self.balance, self.mtp, self.device = balance, mtp, device
        # Pipeline parallelism: only the last stage sees the model's output; `finish` gathers its figures.
        self.pipeline = pipeline
        # Sequence parallelism: CE and MTP losses are shares of the sequence's mean (they add up over its
        # seq_shards ranks), and gradients are averaged over those ranks too: scaling by seq_shards gives the mean.
        self.seq_shards = seq_shards
        self.mtp_weight = mtp.loss_weight
        self._reset()

    def _reset(self) -> None:
        self.n = 0
        self.sums: dict[str, torch.Tensor] = {}
        self.loads: torch.Tensor | None = None

    def begin(self, progress: float) -> None:
        """A new step at `progress` = step / max_steps (completed steps)."""
        self._reset()
        self.mtp_weight = self.mtp.weight_at(progress)

    def _add(self, key: str, value: torch.Tensor) -> None:
        # float64 and in order, as Python floats were summed before: the logged losses stay bit-identical.
        v = value.detach().double()
        self.sums[key] = v if key not in self.sums else self.sums[key] + v

    def loss(self, out: ModelOutput) -> torch.Tensor:
        """The micro-batch's loss to differentiate; its parts are kept for `finish`."""
        ce = out.ce_loss * self.seq_shards if self.seq_shards > 1 else out.ce_loss
        total = ce
        self._add("loss", ce)
        if out.mtp_losses is not None:
            mtp = out.mtp_losses.mean() * self.seq_shards if self.seq_shards > 1 else out.mtp_losses.mean()
            total = total + self.mtp_weight * mtp
            self._add("mtp_loss", mtp)
        alpha = self.balance.seq_alpha
        if out.aux_losses is not None and alpha > 0:
            aux = alpha * out.aux_losses.sum()
            total = total + aux
            self._add("aux_loss", aux)
        if out.expert_loads is not None:
            self.loads = out.expert_loads if self.loads is None else self.loads + out.expert_loads
        self.n += 1
        return total

    def finish(self) -> tuple[float, dict[str, float], torch.Tensor | None]:
        """After the last micro-batch: (mean CE loss, other mean loss terms, expert loads summed), all over ranks."""
        if self.pipeline:
            return self._finish_pipeline()
        keys = ["loss", *sorted(k for k in self.sums if k != "loss")]
        means = all_reduce_mean(torch.stack([self.sums[k] for k in keys]) / self.n, self.device)
        loads = all_reduce_sum_tensor(self.loads) if self.loads is not None else None
        values = dict(zip(keys, means, strict=True))
        return values.pop("loss"), values, loads

    def _finish_pipeline(self) -> tuple[float, dict[str, float], torch.Tensor | None]:
        """`finish` under pipeline parallelism: the means over the last stages (one per data-parallel rank) and
        their expert loads summed, gathered by every rank (small: a few floats and one (layers, E) tensor)."""
        mine = (self.n, {k: float(v) for k, v in self.sums.items()}, None if self.loads is None else self.loads.cpu())
        shares = [s for s in all_gather_object(mine) if s[0]]
        keys = ["loss", *sorted(k for k in shares[0][1] if k != "loss")]
        values = {k: sum(s[1][k] / s[0] for s in shares) / len(shares) for k in keys}
        loads = None if shares[0][2] is None else sum(s[2] for s in shares).to(self.device)
        return values.pop("loss"), values, loads
