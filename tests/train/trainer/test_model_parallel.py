"""Tensor and sequence parallelism as real torchrun/gloo jobs on CPU: fp32 losses within 1e-5 of the single-rank run
of the same global batch, exact and resharded resume, and the same exported weights whatever the layout."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.helpers import losses, run_module, stopped_at, train_args

STEPS = 6
DENSE = ("model=nano",)
DEEPSEEK = ("model=deepseek_tiny", "model.n_layers=3", "model.max_seq_len=256")  # MLA, MoE, MTP
DOCS = ("model.doc_masking=true", "model.doc_position_reset=true")


def _id(model: tuple[str, ...]) -> str:
    return model[0].split("=")[1]


def args(tok: Path, data: Path, run_dir: Path, model: tuple[str, ...], *extra: str) -> list[str]:
    replaced = ("model=", "train.max_steps=", "checkpoint.", "train.eval_every=")
    keep = [a for a in train_args(tok, data, run_dir) if not a.startswith(replaced)]
    return [*keep, *model, f"train.max_steps={STEPS}", "checkpoint.every_steps=3", "train.eval_every=3", *extra]


def launch(nproc: int, argv: list[str]):
    return run_module("torchrun", "--standalone", f"--nproc_per_node={nproc}", "-m", "train.pretrain", *argv)


@pytest.fixture(scope="module")
def runs(tiny_tokenizer, tiny_data, tmp_path_factory):
    """Run NAME with (nproc, model, overrides) once per module; returns its run dir."""
    root = tmp_path_factory.mktemp("parallel")
    done: dict[str, Path] = {}

    def get(name: str, nproc: int, model: tuple[str, ...], *extra: str) -> Path:
        if name not in done:
            done[name] = root / name
            launch(nproc, args(tiny_tokenizer, tiny_data, done[name], model, "deepspeed.zero_stage=1", *extra))
        return done[name]

    return get


def assert_same_losses(run: Path, ref: Path) -> None:
    got, want = losses(run), losses(ref)
    assert sorted(got) == list(range(1, STEPS + 1)) and want[STEPS] < want[1]
    for step, value in want.items():
        assert math.isclose(got[step], value, rel_tol=1e-5), (step, got[step], value)


def assert_same_weights(run: Path, ref: Path, tag: str = f"step_{STEPS:08d}") -> None:
    """model.safetensors (what train.export writes out) holds full, equal weights whatever the layout."""
    got, want = (load_file(r / "checkpoints" / tag / "model.safetensors") for r in (run, ref))
    assert sorted(got) == sorted(want)
    for name, tensor in want.items():
        torch.testing.assert_close(got[name], tensor, rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.slow
@pytest.mark.parametrize("model", [DENSE, DEEPSEEK], ids=["dense", "deepseek"])
def test_tensor_parallel_2_trains_like_one_rank(runs, model):
    ref = runs(f"base_{_id(model)}", 1, model)
    tp = runs(f"tp2_{_id(model)}", 2, model, "parallel.tp_size=2")
    assert_same_losses(tp, ref)
    assert_same_weights(tp, ref)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("name", "model", "extra"),
    [
        ("gqa", DENSE, ()),
        ("gqa_docs_eager", DENSE, (*DOCS, "execution.attn_backend=eager")),
        ("mla_mtp_docs", DEEPSEEK, DOCS),
    ],
)
def test_sequence_parallel_2_trains_like_one_rank(runs, name, model, extra):
    ref = runs(f"base_{name}", 1, model, *extra)
    sp = runs(f"sp2_{name}", 2, model, "parallel.sp_size=2", *extra)
    assert_same_losses(sp, ref)


@pytest.mark.slow
@pytest.mark.parametrize("stage", [1, 2, 3])
def test_sequence_parallel_with_expert_parallel(runs, stage):
    ref = runs("base_deepseek_tiny", 1, DEEPSEEK)
    layout = ("parallel.sp_size=2", "parallel.ep_size=2", f"deepspeed.zero_stage={stage}")
    assert_same_losses(runs(f"sp2_ep2_zero{stage}", 2, DEEPSEEK, *layout), ref)


@pytest.mark.slow
def test_tensor_parallel_under_zero3(runs):
    ref = runs("base_nano", 1, DENSE)
    tp = runs("tp2_zero3", 2, DENSE, "parallel.tp_size=2", "deepspeed.zero_stage=3")
    assert_same_losses(tp, ref)
    assert_same_weights(tp, ref)


@pytest.mark.slow
def test_tensor_parallel_2_by_data_parallel_2(runs):
    """4 processes: tp groups [0, 1], [2, 3] read two different halves of the same global batch."""
    assert_same_losses(runs("tp2_dp2", 4, DENSE, "parallel.tp_size=2"), runs("base_nano", 1, DENSE))


@pytest.mark.slow
@pytest.mark.parametrize("stage", [1, 2, 3])
def test_tensor_parallel_2_by_data_parallel_2_with_expert_parallel_2(runs, stage):
    """4 processes: tensor-parallel groups [0, 1], [2, 3]; the routed experts are sharded over the data-parallel
    ranks of each tensor-parallel rank (expert-parallel [0, 2], [1, 3]) while attention, the dense MLP and the shared
    experts are tensor-parallel. The gradient norm checks that each expert gradient, computed alike by both ranks of
    a tensor-parallel group, is counted once (it is 2% off at step 1 when it is not). ZeRO-3 also partitions each
    rank's expert weights over its expert-data-parallel group ([0, 1], [2, 3]: the tensor-parallel peers)."""
    import json

    ref = runs("base_deepseek_tiny", 1, DEEPSEEK)
    run = runs(f"tp2_ep2_zero{stage}", 4, DEEPSEEK, "parallel.tp_size=2", "parallel.ep_size=2",
               f"deepspeed.zero_stage={stage}")  # fmt: skip
    assert_same_losses(run, ref)
    rows = [[json.loads(line) for line in (r / "metrics.jsonl").read_text().splitlines()] for r in (run, ref)]
    for got, want in zip(*([row for row in rs if "aux_loss" in row] for rs in rows), strict=True):
        for key in ("grad_norm", "aux_loss", "mtp_loss", "moe_max_violation"):
            assert math.isclose(got[key], want[key], rel_tol=1e-5), (key, got["step"], got[key], want[key])
    assert_same_weights(run, ref)  # all experts gathered into model.safetensors, in global order


@pytest.mark.slow
@pytest.mark.parametrize(
    ("saved", "nproc", "resume_with"),
    [
        ("tp2", 2, ("parallel.tp_size=2",)),  # exact resume, same layout
        ("tp2", 1, ()),  # tp 2 -> 1 through the universal checkpoint
        ("sp2", 1, ()),  # sp 2 -> 1 (and a world-size change)
    ],
)
def test_resume_on_the_same_or_another_layout(runs, tiny_tokenizer, tiny_data, tmp_path, saved, nproc, resume_with):
    src = runs("tp2_nano" if saved == "tp2" else "sp2_gqa", 2, DENSE, f"parallel.{saved[:2]}_size=2")
    run_dir = stopped_at(src, tmp_path / "resumed", 3)
    proc = launch(nproc, args(tiny_tokenizer, tiny_data, run_dir, DENSE, "deepspeed.zero_stage=1", *resume_with))
    assert "resumed from" in proc.stderr
    assert ("converting it to" in proc.stderr) == (nproc == 1)
    got, want = losses(run_dir), losses(src)
    for step in range(4, STEPS + 1):
        if resume_with:  # the same layout resumes bit for bit
            assert got[step] == want[step], (step, got[step], want[step])
        else:
            assert math.isclose(got[step], want[step], rel_tol=1e-5), (step, got[step], want[step])


MUON = ("optim=muon",)


@pytest.mark.slow
@pytest.mark.parametrize("model", [DENSE, DEEPSEEK], ids=["dense", "deepseek"])
def test_muon_under_tensor_parallel_2_trains_like_one_rank(runs, model):
    """optim=muon: each rank's slices of the attention and MLP matrices get their part of the whole matrices'
    orthogonalized update (fp32 losses within 1e-5, the same weights)."""
    ref = runs(f"muon_{_id(model)}", 1, model, *MUON)
    tp = runs(f"muon_tp2_{_id(model)}", 2, model, *MUON, "parallel.tp_size=2")
    assert_same_losses(tp, ref)
    assert_same_weights(tp, ref)
    tag = f"step_{STEPS:08d}"
    got, want = (load_file(r / "checkpoints" / tag / "model.safetensors") for r in (tp, ref))
    for name in (n for n in want if "_proj" in n):  # the Muon matrices, sliced or not: within 1e-5 of their scale
        assert (got[name] - want[name]).abs().max() <= 1e-5 * want[name].abs().max(), name


@pytest.mark.slow
@pytest.mark.parametrize(("nproc", "resume_with"), [(2, ("parallel.tp_size=2",)), (1, ())], ids=["tp2", "tp2_to_1"])
def test_muon_resume_under_tensor_parallel(runs, tiny_tokenizer, tiny_data, tmp_path, nproc, resume_with):
    """The Muon momentum of each slice is checkpointed: the same layout resumes bit for bit, one rank through the
    universal checkpoint (slices merged) within 1e-5."""
    src = runs("muon_tp2_nano", 2, DENSE, *MUON, "parallel.tp_size=2")
    run_dir = stopped_at(src, tmp_path / "resumed", 3)
    proc = launch(nproc, args(tiny_tokenizer, tiny_data, run_dir, DENSE, "deepspeed.zero_stage=1", *MUON, *resume_with))
    assert "resumed from" in proc.stderr
    got, want = losses(run_dir), losses(src)
    for step in range(4, STEPS + 1):
        if resume_with:
            assert got[step] == want[step], (step, got[step], want[step])
        else:
            assert math.isclose(got[step], want[step], rel_tol=1e-5), (step, got[step], want[step])


def metric_rows(run: Path) -> dict[int, dict]:
    import json

    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r for r in rows if "loss" in r}


@pytest.mark.slow
@pytest.mark.parametrize("model", [DENSE, DEEPSEEK], ids=["gqa", "mla"])
def test_qk_clip_under_tensor_parallel_2_clips_like_one_rank(runs, model):
    """A rank tracks and rescales its slice of the heads: the logged maxima (every head's, over the group), the
    number of clipped heads and the weights after clipping are the single-rank run's."""
    clip = (*MUON, "optim.qk_clip.enabled=true", "optim.qk_clip.tau=0.1")
    ref = runs(f"clip_{_id(model)}", 1, model, *clip)
    tp = runs(f"clip_tp2_{_id(model)}", 2, model, *clip, "parallel.tp_size=2")
    assert_same_losses(tp, ref)
    assert_same_weights(tp, ref)
    got, want = metric_rows(tp), metric_rows(ref)
    assert want[1]["qk_clipped_heads"] > 0
    for step, row in want.items():
        assert got[step]["qk_clipped_heads"] == row["qk_clipped_heads"], step
        for key in (k for k in row if k.startswith("max_attn_logit")):
            assert math.isclose(got[step][key], row[key], rel_tol=1e-5), (step, key, got[step][key], row[key])


@pytest.mark.slow
@pytest.mark.parametrize("stage", [1, 3])
def test_tensor_with_expert_parallel_resumes_exactly(runs, tiny_tokenizer, tiny_data, tmp_path, stage):
    """ZeRO-1: every tensor-parallel rank's model-states file is written (DeepSpeed's MoE save would write only rank
    0's). ZeRO-3: each rank's partitions of the experts come back from its own files."""
    layout = ("parallel.tp_size=2", "parallel.ep_size=2", f"deepspeed.zero_stage={stage}")
    src = runs(f"tp2_ep2_zero{stage}", 4, DEEPSEEK, *layout)
    if stage == 1:
        assert sorted(p.name for p in (src / "checkpoints" / "step_00000003").glob("mp_rank_*")) == [
            "mp_rank_00_model_states.pt",
            "mp_rank_01_model_states.pt",
        ]
    run_dir = stopped_at(src, tmp_path / "resumed", 3)
    proc = launch(4, args(tiny_tokenizer, tiny_data, run_dir, DEEPSEEK, *layout))
    assert "resumed from" in proc.stderr
    got, want = losses(run_dir), losses(src)
    for step in range(4, STEPS + 1):
        assert got[step] == want[step], (step, got[step], want[step])


@pytest.mark.slow
@pytest.mark.parametrize(("nproc", "resume_with"), [(2, ("parallel.ep_size=2",)), (1, ())], ids=["ep2", "one_rank"])
def test_tensor_with_expert_parallel_resumes_on_another_layout(
    runs, tiny_tokenizer, tiny_data, tmp_path, nproc, resume_with
):
    """tp 2 x dp 2 x ep 2 (ZeRO-1, 4 ranks) -> ep 2 without tensor parallelism on 2 ranks, and -> one rank (all
    experts local), through the universal checkpoint: the expert weights and Adam moments are merged from the ranks
    that hold them (deepspeed_compat `_merge_expert_slices`), the dense ones from their tensor-parallel slices; the
    losses continue within 1e-5."""
    src = runs("tp2_ep2_zero1", 4, DEEPSEEK, "parallel.tp_size=2", "parallel.ep_size=2", "deepspeed.zero_stage=1")
    run_dir = stopped_at(src, tmp_path / "resumed", 3)
    proc = launch(nproc, args(tiny_tokenizer, tiny_data, run_dir, DEEPSEEK, *resume_with, "deepspeed.zero_stage=1"))
    assert "converting it to" in proc.stderr and "resumed from" in proc.stderr
    got, want = metric_rows(run_dir), metric_rows(src)
    for step in range(4, STEPS + 1):
        for key in ("loss", "grad_norm", "aux_loss", "mtp_loss"):
            assert math.isclose(got[step][key], want[step][key], rel_tol=1e-5), (key, step, got[step], want[step])


@pytest.mark.slow
def test_export_writes_the_same_model_whatever_the_layout(runs, tmp_path):
    ref = runs("base_nano", 1, DENSE)
    tp = runs("tp2_nano", 2, DENSE, "parallel.tp_size=2")
    out = {}
    for name, run in (("ref", ref), ("tp", tp)):
        out[name] = tmp_path / name
        run_module("train.export", f"run.dir={run}", f"out={out[name]}")
    got, want = load_file(out["tp"] / "model.safetensors"), load_file(out["ref"] / "model.safetensors")
    assert sorted(got) == sorted(want)
    for name, tensor in want.items():
        torch.testing.assert_close(got[name], tensor, rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.slow
def test_a_16k_token_sequence_trains_with_sequence_parallel_2(tiny_tokenizer, tiny_data, tmp_path):
    """Long context: one 16,384-token sequence per step, split over 2 ranks, trains like one rank (2 steps)."""
    long = ("model=nano", "model.max_seq_len=16384", "train.seq_len=16384", "train.global_batch_tokens=16384",
            "train.micro_batch_size=1", "train.max_steps=2", "train.eval_every=0",
            "deepspeed.zero_stage=1")  # fmt: skip
    out = {}
    for name, nproc, extra in (("ref", 1, ()), ("sp2", 2, ("parallel.sp_size=2",))):
        out[name] = tmp_path / name
        launch(nproc, [*args(tiny_tokenizer, tiny_data, out[name], ()), *long, *extra])
    got, want = losses(out["sp2"]), losses(out["ref"])
    assert sorted(got) == [1, 2]
    for step, value in want.items():
        assert math.isclose(got[step], value, rel_tol=1e-5), (step, got[step], value)
