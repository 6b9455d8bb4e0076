"""The parallel layout: world = tp x sp x pp x dp, expert groups inside it, and the one check of the degrees.

Rank order. Tensor- and sequence-parallel groups are consecutive ranks (rank = dp_rank * tp * sp + inner), as
DeepSpeed's AutoTP mesh builds them; with pipeline parallelism DeepSpeed's topology puts the stage first (rank =
stage * dp + dp_rank). Ranks of one tensor- or sequence-parallel group read the same batch; so do the stages of
one pipeline. Expert-parallel groups are consecutive ranks too; with pipeline parallelism they lie inside one stage
(world 4, pp 2, ep 2: [0, 1] and [2, 3]), and with tensor parallelism they join the ranks of the same tensor-parallel
rank (world 4, tp 2, ep 2: [0, 2] and [1, 3]); either way ep_size divides the data-parallel size. `check` runs in
the plan phase, before any process group exists, and refuses a layout with one message naming the setting and the
fix.
"""

from __future__ import annotations

from dataclasses import dataclass

from model.config import ModelConfig
from train.trainer.layout import check_ep_size


@dataclass(frozen=True)
class ParallelLayout:
    """The degrees of one job; everything else reads them from here."""

    world_size: int
    tp: int = 1
    sp: int = 1
    pp: int = 1
    ep: int = 1

    @property
    def model_parallel(self) -> int:
        """Ranks that together hold one copy of the model and read one batch: tp x sp x pp."""
        return self.tp * self.sp * self.pp

    @property
    def dp(self) -> int:
        """Data-parallel degree: world / (tp x sp x pp)."""
        return self.world_size // self.model_parallel

    def dp_rank(self, rank: int) -> int:
        """The data-parallel index (which batch) of global `rank`."""
        if self.pp > 1:
            return rank % self.dp
        return rank // (self.tp * self.sp)

    def describe(self) -> str:
        return f"dp={self.dp} tp={self.tp} sp={self.sp} pp={self.pp} ep={self.ep}"

    def check(self, model: ModelConfig, seq_len: int, zero_stage: int) -> None:
        """Refuse a layout that does not divide or that this DeepSpeed cannot run (ValueError: setting and fix)."""
        tp, sp, pp, ep, world = self.tp, self.sp, self.pp, self.ep, self.world_size
        if world % self.model_parallel:
            raise ValueError(
                f"parallel.tp_size={tp} x parallel.sp_size={sp} x parallel.pp_size={pp} = {self.model_parallel} "
                f"does not divide the {world} ranks: the data-parallel size is world / (tp x sp x pp). Launch a "
                f"multiple of {self.model_parallel} processes, or choose degrees whose product divides {world}"
            )
        if sum(d > 1 for d in (tp, sp, pp)) > 1:
            raise ValueError(
                f"parallel.tp_size={tp}, sp_size={sp}, pp_size={pp}: only one of tensor, sequence and pipeline "
                "parallelism may exceed 1 in one job here (their composition is not implemented). Keep one of "
                "them above 1 and use data and expert parallelism for the rest"
            )
        if tp > 1:
            self._check_tp(model, zero_stage)
        if sp > 1:
            self._check_sp(model, seq_len)
        if pp > 1:
            self._check_pp(model, zero_stage)
        if ep > 1:
            self._check_ep(model, zero_stage)

    def _check_tp(self, model: ModelConfig, zero_stage: int) -> None:
        tp = self.tp
        if zero_stage == 0:
            raise ValueError(
                f"parallel.tp_size={tp} with deepspeed.zero_stage=0: without ZeRO the gradient norm for clipping is "
                "each rank's local norm, which misses the other ranks' shards. Use deepspeed.zero_stage=1, 2 or 3"
            )
        heads = [("model.n_heads", model.n_heads)]
        if model.attention != "mla":
            heads.append(("model.n_kv_heads", model.n_kv_heads))
        dims = [*heads, ("model.vocab_size", model.vocab_size), ("model.ffn_hidden", model.ffn_hidden)]
        if model.moe.enabled and model.moe.n_shared_experts:
            dims.append(("model.moe.ffn_hidden x n_shared_experts", model.moe.ffn_hidden * model.moe.n_shared_experts))
        for key, value in dims:
            if value % tp:
                raise ValueError(
                    f"parallel.tp_size={tp} must divide {key}={value}: tensor parallelism splits it evenly over the "
                    f"ranks of a group. Choose a tp_size that divides it"
                    + (" (or pad model.vocab_size to a multiple of tp_size)" if key == "model.vocab_size" else "")
                )

    def _check_sp(self, model: ModelConfig, seq_len: int) -> None:
        sp = self.sp
        if seq_len % sp:
            raise ValueError(
                f"parallel.sp_size={sp} must divide train.seq_len={seq_len}: each rank holds an equal shard of "
                f"every sequence. Use a multiple of {sp}"
            )
        heads = [("model.n_heads", model.n_heads)]
        if model.attention != "mla":
            heads.append(("model.n_kv_heads", model.n_kv_heads))
        for key, value in heads:
            if value % sp:
                raise ValueError(
                    f"parallel.sp_size={sp} must divide {key}={value}: Ulysses gives each rank the whole sequence "
                    f"for {key.split('.')[-1]} / sp_size heads. Choose a sp_size that divides it"
                )

    def _check_pp(self, model: ModelConfig, zero_stage: int) -> None:
        pp = self.pp
        if zero_stage != 1:
            raise ValueError(
                f"parallel.pp_size={pp} with deepspeed.zero_stage={zero_stage}: "
                + (
                    "DeepSpeed refuses ZeRO-2 and ZeRO-3 with pipeline parallelism (gradients are reduced once per "
                    "batch, not per micro-batch)"
                    if zero_stage >= 2
                    else "without ZeRO the gradient norm and the non-finite check would be each stage's own"
                )
                + ". Use deepspeed.zero_stage=1"
            )
        if model.n_layers < pp:
            raise ValueError(
                f"parallel.pp_size={pp} exceeds model.n_layers={model.n_layers}: every stage needs at least one "
                "decoder layer. Use pp_size <= n_layers"
            )
        if self.ep > 1 and model.moe.enabled:
            from train.engine.pipeline import check_experts_in_every_stage  # imports DeepSpeed: only when needed

            check_experts_in_every_stage(model, pp, self.ep)

    def _check_ep(self, model: ModelConfig, zero_stage: int) -> None:
        if self.tp > 1 and self.dp % self.ep:
            raise ValueError(
                f"parallel.ep_size={self.ep} must divide the data-parallel size {self.dp} (world "
                f"{self.world_size} / parallel.tp_size={self.tp}): with tensor parallelism the experts are "
                "sharded over the data-parallel ranks of each tensor-parallel rank. Choose an ep_size that "
                f"divides {self.dp}, or launch more ranks"
            )
        if self.pp > 1 and self.dp % self.ep:
            raise ValueError(
                f"parallel.ep_size={self.ep} must divide the data-parallel size {self.dp} (world {self.world_size} / "
                f"parallel.pp_size={self.pp}): with pipeline parallelism the expert groups are built inside each "
                f"stage, over its data-parallel ranks. Choose an ep_size that divides {self.dp}, or launch more ranks"
            )
        check_ep_size(self.ep, self.world_size, model.moe.n_routed_experts, zero_stage)
