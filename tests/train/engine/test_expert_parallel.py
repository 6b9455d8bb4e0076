"""Expert parallelism: the all-to-all dispatcher on two real gloo ranks, and the checks on ep_size."""

from __future__ import annotations

import pytest
import torch

from tests.helpers import run_module
from train.trainer.layout import check_ep_size


def ep_worker(case: str) -> str:
    """Run tests/train/engine/ep_worker.py CASE on 2 CPU ranks; a hang fails on the timeout."""
    args = ("torchrun", "--standalone", "--nproc_per_node=2", "-m", "tests.train.engine.ep_worker", case)
    return run_module(*args, timeout=240).stdout


@pytest.mark.slow
def test_sharded_experts_match_full_experts_even_when_a_rank_gets_no_tokens():
    assert "OK layer" in ep_worker("layer")


@pytest.mark.slow
def test_zero3_steps_finish_when_a_rank_s_experts_get_no_tokens():
    assert "OK skewed_zero3" in ep_worker("skewed_zero3")


def test_default_dispatcher_keeps_every_expert_local():
    from model.config import MoEConfig
    from model.moe import ExpertDispatcher, MoE

    torch.manual_seed(0)
    layer = MoE(16, MoEConfig(enabled=True, n_routed_experts=4, ffn_hidden=8))
    assert layer.experts.gate_up_proj.shape[0] == 4  # no dispatcher: all experts (ep_size is the dispatcher's)
    x, counts = torch.randn(5, 16), torch.tensor([2, 0, 3, 0])
    recv_counts, handle = ExpertDispatcher().plan(counts)
    assert recv_counts.tolist() == [[2, 0, 3, 0]]
    assert ExpertDispatcher().dispatch(x, handle) is x and ExpertDispatcher().combine(x, handle) is x


@pytest.mark.parametrize(
    ("ep_size", "world", "experts", "stage", "message"),
    [
        (2, 3, 8, 2, "must divide the number of ranks (3)"),
        (4, 4, 6, 2, "must divide model.moe.n_routed_experts=6"),
        (2, 2, 8, 0, "deepspeed.zero_stage=0"),
    ],
)
def test_bad_ep_size_is_refused(ep_size, world, experts, stage, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        check_ep_size(ep_size, world, experts, stage)
    check_ep_size(1, world, experts, stage)  # ep_size=1 always runs
