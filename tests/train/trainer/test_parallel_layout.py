"""The degree arithmetic of `parallel.*` and every layout it refuses (fast: no process is started)."""

from __future__ import annotations

import pytest

from model.config import ModelConfig, MoEConfig
from train.trainer.parallel import ParallelLayout

NANO = ModelConfig(vocab_size=2048, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden=192)
MOE = ModelConfig(vocab_size=2048, d_model=64, n_layers=2, n_heads=4, n_kv_heads=4, ffn_hidden=192,
                  moe=MoEConfig(enabled=True, n_routed_experts=8, n_shared_experts=1, ffn_hidden=96))  # fmt: skip
MOE_EVERY = ModelConfig(vocab_size=2048, d_model=64, n_layers=2, n_heads=4, n_kv_heads=4, ffn_hidden=192,
                        moe=MoEConfig(enabled=True, n_routed_experts=8, ffn_hidden=96, first_k_dense=0))  # fmt: skip
"""Every layer MoE: each pipeline stage holds routed experts, as expert parallelism in a pipeline needs."""


def test_data_parallel_size_is_world_over_model_parallel_degrees():
    assert ParallelLayout(8, tp=2).dp == 4
    assert ParallelLayout(8, sp=4).dp == 2
    assert ParallelLayout(4, tp=2).dp_rank(3) == 1 and ParallelLayout(4, tp=2).dp_rank(1) == 0  # tp groups [0,1],[2,3]
    assert [ParallelLayout(4, pp=2).dp_rank(r) for r in range(4)] == [0, 1, 0, 1]  # stage-major, as DeepSpeed's
    for layout in (
        ParallelLayout(4, tp=2),
        ParallelLayout(2, sp=2),
        ParallelLayout(4, sp=2, ep=2),
        ParallelLayout(2, pp=2),
        ParallelLayout(4, tp=2, ep=2),  # expert groups over the data-parallel ranks of each tensor-parallel rank
        ParallelLayout(8, tp=2, ep=4),
        ParallelLayout(4, pp=2, ep=2),  # expert groups inside each stage's data-parallel ranks
        ParallelLayout(8, pp=2, ep=2),
    ):
        layout.check((MOE_EVERY if layout.pp > 1 else MOE) if layout.ep > 1 else NANO, 64, 1)
    for stage in (2, 3):  # tensor with expert parallelism under ZeRO-2 and ZeRO-3 too
        ParallelLayout(4, tp=2, ep=2).check(MOE, 64, stage)


@pytest.mark.parametrize(
    ("layout", "model", "seq_len", "stage", "message"),
    [
        (ParallelLayout(3, tp=2), NANO, 64, 1, "= 2 does not divide the 3 ranks"),
        (ParallelLayout(4, tp=2, sp=2), NANO, 64, 1, "only one of tensor, sequence and pipeline"),
        (ParallelLayout(4, tp=4), NANO, 64, 1, "parallel.tp_size=4 must divide model.n_kv_heads=2"),
        (ParallelLayout(2, tp=2), NANO, 64, 0, "parallel.tp_size=2 with deepspeed.zero_stage=0"),
        (
            ParallelLayout(3, tp=3),
            ModelConfig(vocab_size=2048, n_heads=3, n_kv_heads=3, d_model=48),
            64,
            1,
            "must divide model.vocab_size=2048",
        ),  # fmt: skip
        (ParallelLayout(2, tp=2, ep=2), MOE, 64, 1, "parallel.ep_size=2 must divide the data-parallel size 1"),
        (ParallelLayout(2, sp=2), NANO, 63, 1, "parallel.sp_size=2 must divide train.seq_len=63"),
        (ParallelLayout(4, sp=4), NANO, 64, 1, "parallel.sp_size=4 must divide model.n_kv_heads=2"),
        (ParallelLayout(2, pp=2), NANO, 64, 2, "DeepSpeed refuses ZeRO-2 and ZeRO-3 with pipeline"),
        (ParallelLayout(2, pp=2), NANO, 64, 3, "Use\ndeepspeed.zero_stage=1".replace("\n", " ")),
        (ParallelLayout(4, pp=4), NANO, 64, 1, "parallel.pp_size=4 exceeds model.n_layers=2"),
        (ParallelLayout(2, pp=2), NANO, 64, 0, "parallel.pp_size=2 with deepspeed.zero_stage=0"),
        (ParallelLayout(4, pp=2, ep=4), MOE_EVERY, 64, 1, "parallel.ep_size=4 must divide the data-parallel size 2"),
        (ParallelLayout(6, pp=2, ep=2), MOE_EVERY, 64, 1, "parallel.ep_size=2 must divide the data-parallel size 3"),
        (ParallelLayout(4, pp=2, ep=2), MOE, 64, 1, "pipeline stage 0 holds decoder layers [0], none of them MoE"),
        (ParallelLayout(2, sp=2, ep=4), MOE, 64, 1, "model.moe.ep_size=4 must divide the number of ranks (2)"),
    ],
)
def test_a_layout_that_cannot_run_is_refused_with_the_setting_and_the_fix(layout, model, seq_len, stage, message):
    with pytest.raises(ValueError) as e:
        layout.check(model, seq_len, stage)
    assert message in str(e.value)
