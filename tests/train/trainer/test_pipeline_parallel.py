"""Pipeline parallelism as real torchrun/gloo jobs on CPU (DeepSpeed PipelineModule + train_batch, ZeRO-1): fp32
losses within 1e-5 of the single-rank run of the same global batch (dense, and DeepSeek-style MoE + MTP whose balance
losses and expert loads cross the stages), exact resume, and the same exported weights."""

from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import load_file

from tests.helpers import losses, run_module, stopped_at
from tests.train.trainer.test_model_parallel import (
    DEEPSEEK,
    DENSE,
    STEPS,
    args,
    assert_same_losses,
    assert_same_weights,
    launch,
)


@pytest.fixture(scope="module")
def runs(tiny_tokenizer, tiny_data, tmp_path_factory):
    """Run NAME with (nproc, model, overrides) once per module (ZeRO-1); returns its run dir."""
    root = tmp_path_factory.mktemp("pipeline")
    done = {}

    def get(name, nproc, model, *extra):
        if name not in done:
            done[name] = root / name
            launch(nproc, args(tiny_tokenizer, tiny_data, done[name], model, "deepspeed.zero_stage=1", *extra))
        return done[name]

    return get


@pytest.mark.slow
@pytest.mark.parametrize("model", [DENSE, DEEPSEEK], ids=["dense", "deepseek"])
def test_pipeline_2_trains_like_one_rank(runs, model):
    name = model[0].split("=")[1]
    ref = runs(f"base_{name}", 1, model)
    pp = runs(f"pp2_{name}", 2, model, "parallel.pp_size=2")
    assert_same_losses(pp, ref)
    if name == "dense":
        assert_same_weights(pp, ref)  # model.safetensors: every stage's weights, under the single-rank names
    else:
        # The tied embedding's gradient is summed over the stages (lookups on the first; head and MTP on the
        # last) in another order than on one rank. For a row whose terms nearly cancel, Adam's m / (sqrt(v) + eps)
        # turns that rounding into up to ~lr * 1e-2 (measured 1.6e-5 on one row of 2,048): weights within 1e-4.
        got, want = (load_file(r / "checkpoints" / f"step_{STEPS:08d}" / "model.safetensors") for r in (pp, ref))
        assert sorted(got) == sorted(want)
        for key, tensor in want.items():
            torch.testing.assert_close(got[key], tensor, rtol=1e-4, atol=1e-4, msg=key)
    if name == "deepseek":  # the balance loss and the expert loads (MoEBalance's input) crossed the stages
        rows = {r: [line for line in (run / "metrics.jsonl").read_text().splitlines() if '"aux_loss"' in line]
                for r, run in (("ref", ref), ("pp", pp))}  # fmt: skip
        assert len(rows["pp"]) == STEPS and rows["pp"] and all("moe_max_violation" in r for r in rows["pp"])
        import json

        for got, want in zip(rows["pp"], rows["ref"], strict=True):
            g, w = json.loads(got), json.loads(want)
            for key in ("aux_loss", "mtp_loss", "moe_max_violation"):
                assert math.isclose(g[key], w[key], rel_tol=1e-5), (key, g[key], w[key])


@pytest.mark.slow
def test_pipeline_2_resumes_exactly(runs, tiny_tokenizer, tiny_data, tmp_path):
    src = runs("pp2_nano", 2, DENSE, "parallel.pp_size=2")
    _assert_resumes_exactly(src, 2, (tiny_tokenizer, tiny_data), tmp_path, DENSE, "parallel.pp_size=2")


def _assert_resumes_exactly(src, nproc: int, tok_data, tmp_path, model, *layout: str) -> None:
    """Stop a copy of run `src` after step 3, resume it on the same layout (ZeRO-1): every later loss and the final
    weights equal the uninterrupted run's, bit for bit."""
    run_dir = stopped_at(src, tmp_path / "resumed", 3)
    proc = launch(nproc, args(*tok_data, run_dir, model, "deepspeed.zero_stage=1", *layout))
    assert "resumed from" in proc.stderr
    got, want = losses(run_dir), losses(src)
    for step in range(4, STEPS + 1):
        assert got[step] == want[step], (step, got[step], want[step])
    assert_same_weights(run_dir, src)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("saved", "nproc", "model", "layout", "resume_with"),
    [
        # pp 2 x dp 2 (ZeRO-1 partitions over 2 ranks per stage) -> 2 ranks, ZeRO-2
        ("pp2_dp2_nano", 4, DENSE, ("parallel.pp_size=2",), ("deepspeed.zero_stage=2",)),
        # pp 2 -> 1 rank; the routers' balancing biases (buffers) come back too
        ("pp2_deepseek_tiny", 2, DEEPSEEK, ("parallel.pp_size=2",), ()),
    ],
    ids=["dense_pp2_dp2_to_zero2_on_2", "deepseek_pp2_to_1"],
)
def test_a_pipeline_checkpoint_resumes_without_pipeline(
    runs, tiny_tokenizer, tiny_data, tmp_path, saved, nproc, model, layout, resume_with
):
    """Our converter (train/checkpoint/pipeline_universal.py; DeepSpeed's ds_to_universal cannot read a
    PipelineModule checkpoint) writes the universal checkpoint a job without pipeline parallelism resumes from:
    weights and Adam states, so steps 4-6 (two of them after updates from the restored moments) give the losses of
    the uninterrupted pipeline run and of the single-rank run."""
    src = runs(saved, nproc, model, *layout)
    ref = runs(f"base_{model[0].split('=')[1]}", 1, model)
    run_dir = stopped_at(src, tmp_path / "resumed", 3)
    extra = ("deepspeed.zero_stage=1", *resume_with)
    proc = launch(2 if resume_with else 1, args(tiny_tokenizer, tiny_data, run_dir, model, *extra))
    assert "converting it to" in proc.stderr and "resumed from" in proc.stderr
    got = losses(run_dir)
    for want in (losses(src), losses(ref)):
        for step in range(4, STEPS + 1):
            assert math.isclose(got[step], want[step], rel_tol=1e-5), (step, got[step], want[step])
    if model == DENSE:
        assert_same_weights(run_dir, src)
    else:  # a universal load restores parameters only: the biases must come back from model.safetensors
        got, want = (load_file(r / "checkpoints" / f"step_{STEPS:08d}" / "model.safetensors") for r in (run_dir, src))
        biases = [k for k in want if k.endswith("e_score_correction_bias")]
        assert biases and any(want[k].abs().max() > 0 for k in biases)
        for key in biases:
            torch.testing.assert_close(got[key], want[key], rtol=0, atol=0, msg=key)


@pytest.mark.slow
def test_export_of_a_pipeline_run_is_the_single_rank_model(runs, tmp_path):
    import torch
    from safetensors.torch import load_file

    out = {}
    for name, run in (("ref", runs("base_nano", 1, DENSE)), ("pp", runs("pp2_nano", 2, DENSE, "parallel.pp_size=2"))):
        out[name] = tmp_path / name
        run_module("train.export", f"run.dir={run}", f"out={out[name]}")
    got, want = load_file(out["pp"] / "model.safetensors"), load_file(out["ref"] / "model.safetensors")
    assert sorted(got) == sorted(want)
    for name, tensor in want.items():
        torch.testing.assert_close(got[name], tensor, rtol=1e-4, atol=1e-5, msg=name)


def _metric_rows(run, key: str) -> list[dict]:
    import json

    return [row for line in (run / "metrics.jsonl").read_text().splitlines() if key in (row := json.loads(line))]


@pytest.mark.slow
def test_pipeline_2_with_expert_parallel_2_trains_like_one_rank(runs):
    """4 processes, pp 2 x dp 2, ep 2 (DeepSeek-V3's PP + EP + ZeRO-1): stages [0, 1] and [2, 3], expert groups
    [0, 1] and [2, 3] inside them, each rank holding 4 of the 8 routed experts of its stage's MoE layers."""
    ref = runs("base_deepseek_tiny", 1, DEEPSEEK)
    run = runs("pp2_ep2", 4, DEEPSEEK, "parallel.pp_size=2", "parallel.ep_size=2")
    assert_same_losses(run, ref)
    for got, want in zip(_metric_rows(run, "aux_loss"), _metric_rows(ref, "aux_loss"), strict=True):
        for key in ("aux_loss", "mtp_loss", "moe_max_violation", "grad_norm"):
            assert math.isclose(got[key], want[key], rel_tol=1e-5), (key, got[key], want[key])
    # model.safetensors holds all experts in global order (gathered from each stage's expert group); the tied
    # embedding's tolerance as in test_pipeline_2_trains_like_one_rank.
    got, want = (load_file(r / "checkpoints" / f"step_{STEPS:08d}" / "model.safetensors") for r in (run, ref))
    assert sorted(got) == sorted(want)
    for key, tensor in want.items():
        torch.testing.assert_close(got[key], tensor, rtol=1e-4, atol=1e-4, msg=key)


@pytest.mark.slow
def test_pipeline_with_expert_parallel_resumes_exactly(runs, tiny_tokenizer, tiny_data, tmp_path):
    layout = ("parallel.pp_size=2", "parallel.ep_size=2")
    src = runs("pp2_ep2", 4, DEEPSEEK, *layout)
    _assert_resumes_exactly(src, 4, (tiny_tokenizer, tiny_data), tmp_path, DEEPSEEK, *layout)


@pytest.mark.slow
def test_expert_parallel_refuses_a_stage_without_moe_layers(tiny_tokenizer, tiny_data, tmp_path):
    """first_k_dense=2 of 3 layers: stage 0 holds the two dense layers (ZeRO-1 would reduce the gradient norm over
    the stages once per parameter group, and only the other stage has expert groups)."""
    extra = ("deepspeed.zero_stage=1", "parallel.pp_size=2", "parallel.ep_size=2", "model.moe.first_k_dense=2")
    proc = run_module("torchrun", "--standalone", "--nproc_per_node=4", "-m", "train.pretrain",
                      *args(tiny_tokenizer, tiny_data, tmp_path / "run", DEEPSEEK, *extra), check=False)  # fmt: skip
    assert proc.returncode != 0
    assert "error: parallel.ep_size=2 with parallel.pp_size=2: pipeline stage 0 holds decoder layers [0, 1]" in (
        proc.stderr
    )
