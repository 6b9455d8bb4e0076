"""Validation during training: `val_loss` over the validation split and `val_loss/SOURCE` per source, at the start,
every `train.eval_every` steps and at the last step; beside each, `val_bpb` and `val_bpb/SOURCE` (bits per byte).

Bits per byte = sum of the token losses in nats / ln 2 / the UTF-8 bytes of the text the predicted tokens decode to.
The bytes are counted exactly from the label ids with the tokenizer's per-id byte table (`token_bytes()`: decoding
is a concatenation of pieces, so a document's ids add up to the bytes of its cleaned text; the eos after each
document counts 0 bytes, its loss counts). Comparable across tokenizers, unlike nats per token.
"""

from __future__ import annotations

import math

import torch

from data_pipeline.loader import PackedSequences, iter_eval_batches
from train.callbacks.base import Callback, StepResult
from train.config import TrainConfig
from train.engine.distributed import all_reduce_sum


class Validator(Callback):
    def __init__(self, cfg: TrainConfig, val_data: PackedSequences | None, val_sources: dict[str, PackedSequences],
                 token_bytes: list[int] | None = None):  # fmt: skip
        self.cfg, self.val_data, self.val_sources = cfg, val_data, val_sources
        self.token_bytes = None if token_bytes is None else torch.tensor(token_bytes, dtype=torch.long)
        self.first: float | None = None
        self.last: float | None = None

    def due(self, step: int) -> bool:
        every = self.cfg.eval_every
        return bool(every) and (step % every == 0 or step == self.cfg.max_steps)

    def pre_train(self) -> None:
        if self.cfg.eval_every and self.trainer.step == 0:
            val = self.evaluate()
            self.first = self.last = val.get("val_loss")
            if val:
                self.trainer.log({**val, "tokens": 0, "elapsed_s": 0.0})

    def post_step(self, result: StepResult, metrics: dict) -> None:
        if self.due(result.step):
            metrics.update(self.evaluate())
            self.last = metrics.get("val_loss")

    @torch.no_grad()
    def _mean_loss(self, data: PackedSequences, sequences: int) -> tuple[float | None, float | None]:
        """Mean token loss and bits per byte on `sequences` validation sequences spread over `data` (always the
        same ones); bpb is None without a byte table or when the tokens cover no bytes."""
        d, engine = self.trainer.d, self.trainer.engine
        dp_rank, dp_size = engine.dp_rank, engine.dp_size  # a tensor/sequence-parallel group reads one batch
        per_rank = min(len(data), sequences) // dp_size  # equal work on every rank (ZeRO-3 collectives)
        total, count, nbytes = 0.0, 0, 0
        for x, y in iter_eval_batches(data, self.cfg.micro_batch_size, per_rank * dp_size, dp_rank, dp_size):
            loss = engine.eval_loss(x.to(d.device), y.to(d.device))
            # Every rank of a group adds the batch: sequence-parallel ranks their shares (x shards = their mean);
            # pipeline stages all hold their pipelines' mean.
            total += loss.item() * y.numel() * engine.seq_shards
            count += y.numel()
            if self.token_bytes is not None:
                nbytes += int(self.token_bytes[y].sum())
        total, count, nbytes = all_reduce_sum([total, count, nbytes], d.device)
        loss = total / count if count else None
        bpb = total / math.log(2) / nbytes if self.token_bytes is not None and nbytes else None
        return loss, bpb

    def evaluate(self) -> dict[str, float]:
        if self.val_data is None:
            return {}
        engine = self.trainer.engine
        engine.eval()
        out = {}
        out["val_loss"], out["val_bpb"] = self._mean_loss(self.val_data, self.cfg.eval_sequences)
        if self.cfg.eval_per_source:
            share = max(self.trainer.d.world_size, self.cfg.eval_sequences // max(1, len(self.val_sources)))
            for name, data in self.val_sources.items():
                out[f"val_loss/{name}"], out[f"val_bpb/{name}"] = self._mean_loss(data, share)
        engine.train()
        return {k: v for k, v in out.items() if v is not None}
