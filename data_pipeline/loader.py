"""Rank-aware, resumable loading of fixed-length sequences from prepared token shards.

The split's token stream is cut into sequences of `seq_len + 1` tokens (inputs and shifted labels) that overlap by
one token. Sequences are visited in a seeded permutation per epoch. The global order depends only on the seed and
the number of sequences consumed, never on the data-parallel size: in every optimizer step the global batch
covers positions [consumed, consumed + global_batch) of that order, and rank r of R takes, for micro-step a, the
micro-batch starting at consumed + (a * R + r) * micro. Resuming with another R therefore repeats or skips nothing.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from data_pipeline.shards import TokenStream, read_manifest


class PackedSequences:
    """Sequences i = tokens[i * seq_len : i * seq_len + seq_len + 1] of one split (or one source's val split)."""

    def __init__(self, data_dir: str | Path, split: str, seq_len: int, source: str | None = None) -> None:
        manifest = read_manifest(data_dir)
        shards = manifest["splits"][split]["shards"]
        if source is not None:
            shards = [s for s in shards if s.get("source") == source]
        self.stream = TokenStream(data_dir, shards, manifest["dtype"])
        self.seq_len = seq_len
        self.num_sequences = max(0, (len(self.stream) - 1) // seq_len)

    def __len__(self) -> int:
        return self.num_sequences

    def __getitem__(self, i: int) -> np.ndarray:
        return self.stream.read(i * self.seq_len, self.seq_len + 1)


class DistributedBatchLoader:
    """Yields this rank's micro-batches (input_ids, labels); state is the global count of sequences consumed."""

    def __init__(
        self, data: PackedSequences, micro_batch_size: int, grad_accum: int, dp_rank: int, dp_size: int, seed: int
    ) -> None:
        if len(data) == 0:
            raise ValueError("the training split holds fewer tokens than one sequence: prepare more data")
        self.data, self.micro, self.accum = data, micro_batch_size, grad_accum
        self.rank, self.world, self.seed = dp_rank, dp_size, seed
        self.consumed = 0
        self._perm_epoch, self._perm = -1, None

    @property
    def global_batch(self) -> int:
        return self.micro * self.accum * self.world

    def _index(self, position: int) -> int:
        epoch, offset = divmod(position, len(self.data))
        if epoch != self._perm_epoch:
            self._perm = np.random.default_rng([self.seed, epoch]).permutation(len(self.data))
            self._perm_epoch = epoch
        return int(self._perm[offset])

    def sample_ids(self, micro_step: int) -> list[int]:
        """Sequence indices of this rank's micro-batch `micro_step` of the next optimizer step."""
        start = self.consumed + (micro_step * self.world + self.rank) * self.micro
        return [self._index(p) for p in range(start, start + self.micro)]

    def next_step(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """All micro-batches of this rank for one optimizer step; advances the global position."""
        batches = []
        for a in range(self.accum):
            seqs = np.stack([self.data[i] for i in self.sample_ids(a)])
            batch = torch.from_numpy(seqs)
            batches.append((batch[:, :-1].contiguous(), batch[:, 1:].contiguous()))
        self.consumed += self.global_batch
        return batches

    def skip(self, positions) -> None:
        """Step over the global batches that start at any of `positions` (batches a rollback steps over)."""
        while self.consumed in positions:
            self.consumed += self.global_batch

    def state_dict(self) -> dict:
        """Saved: sequences consumed globally, the seed, and the dataset size (to catch a changed dataset)."""
        return {"consumed": self.consumed, "seed": self.seed, "num_sequences": len(self.data)}

    def load_state_dict(self, state: dict) -> None:
        if state["num_sequences"] != len(self.data) or state["seed"] != self.seed:
            raise ValueError(
                f"checkpoint data position was saved for {state['num_sequences']} sequences with seed {state['seed']}, "
                f"but this run has {len(self.data)} sequences with seed {self.seed}: resume with the same data, "
                "train.seq_len and train.seed, or start a new run.dir"
            )
        self.consumed = int(state["consumed"])


def iter_eval_batches(data: PackedSequences, micro_batch_size: int, max_sequences: int, dp_rank: int, dp_size: int):
    """`max_sequences` validation sequences spread evenly over the split (so every source is represented, and the
    same ones every time), divided across ranks; yields (input_ids, labels)."""
    n = min(len(data), max_sequences)
    chosen = np.linspace(0, len(data) - 1, n).round().astype(np.int64) if n else np.zeros(0, dtype=np.int64)
    mine = chosen[dp_rank::dp_size].tolist()
    for i in range(0, len(mine), micro_batch_size):
        batch = torch.from_numpy(np.stack([data[j] for j in mine[i : i + micro_batch_size]]))
        yield batch[:, :-1].contiguous(), batch[:, 1:].contiguous()
