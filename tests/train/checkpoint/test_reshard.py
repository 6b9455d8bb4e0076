"""Resharded resume: a checkpoint saved by 2 ranks under ZeRO-2 resumes on 1 rank under ZeRO-1, and on 2 ranks under
ZeRO-3, through DeepSpeed's universal checkpoint (converted automatically); the losses continue as in the uninterrupted
run and the data position carries over (no sequence repeated or skipped)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from tests.helpers import STEPS, run_module, stopped_at, train_args
from train import checkpoint
from train.checkpoint.compat import needs_universal


@pytest.fixture
def stopped_at_step_5(trained_run, tmp_path) -> Path:
    """The session's 2-rank ZeRO-2 run as it was after step 5: its checkpoint there, metrics up to step 5."""
    return stopped_at(trained_run, tmp_path / "reshard", 5)


def _train_rows(run_dir: Path) -> dict[int, dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r for r in rows if "loss" in r}


@pytest.mark.slow
@pytest.mark.parametrize("nproc,stage", [(1, 1), (2, 3)])
def test_two_rank_zero2_checkpoint_resumes_resharded(
    stopped_at_step_5, trained_run, tiny_tokenizer, tiny_data, nproc, stage
):
    run_dir = stopped_at_step_5
    args = train_args(tiny_tokenizer, tiny_data, run_dir, f"deepspeed.zero_stage={stage}")
    proc = run_module("torchrun", "--standalone", f"--nproc_per_node={nproc}", "-m", "train.pretrain", *args)
    tag_dir = run_dir / "checkpoints" / "step_00000005"
    assert f"converting it to {tag_dir / 'universal'}" in proc.stderr and f"resumed from {tag_dir}" in proc.stderr
    ref, got = _train_rows(trained_run), _train_rows(run_dir)
    assert sorted(got) == list(range(1, STEPS + 1))
    for step in range(6, STEPS + 1):
        # Same batches, same optimizer state: equal up to the order of floating-point sums over ranks.
        assert math.isclose(got[step]["loss"], ref[step]["loss"], rel_tol=1e-5), (step, got[step], ref[step])
        assert got[step]["tokens"] == ref[step]["tokens"]  # the global data position, whatever the world size
        assert math.isclose(got[step]["lr"], ref[step]["lr"], rel_tol=1e-9)
    meta = checkpoint.read_meta(run_dir / "checkpoints", "step_00000010")
    assert (meta["world_size"], meta["zero_stage"]) == (nproc, stage)
    assert checkpoint.latest_tag(run_dir / "checkpoints") == "step_00000010"


def test_which_changes_go_through_the_universal_checkpoint():
    with pytest.raises(ValueError, match="universal checkpoint, which needs ZeRO 1-3 on both sides"):
        needs_universal({"world_size": 2, "zero_stage": 0}, 1, 2, Path("ckpt"))
    assert not needs_universal({"world_size": 2, "zero_stage": 0}, 1, 0, Path("ckpt"))
    assert not needs_universal({"world_size": 2, "zero_stage": 2}, 2, 2, Path("ckpt"))
    assert needs_universal({"world_size": 2, "zero_stage": 2}, 2, 1, Path("ckpt"))


def test_a_tensor_parallel_change_goes_through_the_universal_checkpoint():
    saved = {"world_size": 2, "zero_stage": 1, "tp_size": 2}
    assert needs_universal(saved, 2, 1, Path("ckpt"), tp_size=1)
    assert not needs_universal(saved, 2, 1, Path("ckpt"), tp_size=2)
    assert not needs_universal({"world_size": 2, "zero_stage": 1}, 2, 1, Path("ckpt"))  # sp shards no parameter
    with pytest.raises(ValueError, match="parallel.tp_size=2"):
        needs_universal({**saved, "zero_stage": 0}, 2, 0, Path("ckpt"), tp_size=1)


def test_a_pipeline_checkpoint_reshards_only_to_a_layout_without_pipeline():
    saved = {"world_size": 2, "zero_stage": 1, "pp_size": 2}
    assert not needs_universal(saved, 2, 1, Path("ckpt"), pp_size=2)
    for world, stage in ((1, 1), (2, 1), (2, 2), (4, 3)):  # train/checkpoint/pipeline_universal.py converts it
        assert needs_universal(saved, world, stage, Path("ckpt"))
    for world, pp, tp, ep, stage in ((4, 2, 1, 1, 1), (2, 1, 2, 1, 1), (2, 1, 1, 2, 1), (2, 1, 1, 1, 0)):
        with pytest.raises(ValueError, match="Resume with parallel.pp_size=2 on 2 ranks, or with pp_size=1"):
            needs_universal(saved, world, stage, Path("ckpt"), tp_size=tp, pp_size=pp, ep_size=ep)
    with pytest.raises(ValueError, match="with parallel.pp_size=2, tp_size=1, ep_size=1 on 2 ranks"):
        needs_universal({"world_size": 1, "zero_stage": 1}, 2, 1, Path("ckpt"), pp_size=2)


def test_a_tensor_and_expert_parallel_checkpoint_is_resharded_between_zero_1_and_2_only():
    saved = {"world_size": 4, "zero_stage": 1, "tp_size": 2, "ep_size": 2}
    assert not needs_universal(saved, 4, 1, Path("ckpt"), tp_size=2, ep_size=2)
    assert needs_universal(saved, 2, 1, Path("ckpt"), tp_size=1, ep_size=2)
    assert needs_universal(saved, 4, 2, Path("ckpt"), tp_size=2, ep_size=2)
    for where, stage in ((saved, 3), ({**saved, "zero_stage": 3}, 1)):
        with pytest.raises(ValueError, match="resharded from ZeRO-1/2 files to a ZeRO-1/2 job only"):
            needs_universal(where, 2, stage, Path("ckpt"), tp_size=1, ep_size=2)


def test_another_expert_parallel_degree_is_resharded_between_zero_1_and_2_only():
    old = {"world_size": 2, "zero_stage": 2, "ep_size": 2}
    assert needs_universal(old, 2, 2, Path("ckpt"), ep_size=1)  # same world and stage, another ep_size
    assert needs_universal(old, 1, 1, Path("ckpt"))
    assert needs_universal({"world_size": 1, "zero_stage": 1}, 2, 2, Path("ckpt"), ep_size=2)
    for meta, stage, pp in (
        (old, 3, 1),
        ({**old, "zero_stage": 3}, 2, 1),
        ({**old, "zero_stage": 1, "pp_size": 2}, 1, 2),
    ):
        with pytest.raises(ValueError, match="another expert-parallel degree is resharded from ZeRO-1/2 files"):
            needs_universal(meta, 2, stage, Path("ckpt"), pp_size=pp, ep_size=1)


def test_pipeline_parameter_names_map_to_the_model_s():
    """The converter's name map (PipelineEngine also checks it against the live modules at every start)."""
    from train.engine.pipeline import model_param_name

    assert model_param_name("tied_modules.embed.embed_tokens.weight", 2) == "embed_tokens.weight"
    assert model_param_name("1.block.self_attn.q_proj.weight", 2) == "layers.0.self_attn.q_proj.weight"
    assert model_param_name("2.block.mlp.experts.down_proj", 2) == "layers.1.mlp.experts.down_proj"
    assert model_param_name("3.norm.weight", 2) == "norm.weight"
    assert model_param_name("3.mtp.0.eh_proj.weight", 2) == "mtp.0.eh_proj.weight"
    for name in ("0.embed_tokens.weight", "4.embed_tokens.weight", "1.norm.weight"):
        with pytest.raises(ValueError, match="is not a parameter name of a 2-layer pipeline"):
            model_param_name(name, 2)
