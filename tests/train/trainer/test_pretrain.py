"""Real 2-process DeepSpeed runs on CPU (gloo): ZeRO-stage parity, resume exactness, run-directory contents."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from tests.helpers import STEPS, losses, run_module, torchrun_pretrain, train_args

pytestmark = pytest.mark.slow  # torchrun jobs: excluded by `make test-fast`


@pytest.fixture(scope="module")
def zero_runs(trained_run, tiny_tokenizer, tiny_data, tmp_path_factory) -> dict[int, Path]:
    """The same 10-step run under ZeRO stages 0-3 (stage 2 is the session's `trained_run`)."""
    root = tmp_path_factory.mktemp("zero")
    runs = {2: trained_run}
    for stage in (0, 1, 3):
        runs[stage] = root / f"zero{stage}"
        torchrun_pretrain(*train_args(tiny_tokenizer, tiny_data, runs[stage], f"deepspeed.zero_stage={stage}"))
    return runs


def test_zero_stages_give_the_same_losses(zero_runs):
    ref = losses(zero_runs[0])
    assert sorted(ref) == list(range(1, STEPS + 1))
    assert ref[STEPS] < ref[1], "loss should fall over 10 steps"
    for stage in (0, 1, 2, 3):  # every update applied: none skipped as non-finite or as a spike
        rows = [json.loads(line) for line in (zero_runs[stage] / "metrics.jsonl").read_text().splitlines()]
        assert not any("skipped" in row for row in rows), stage
    for stage in (1, 2, 3):
        other = losses(zero_runs[stage])
        for step, value in ref.items():
            assert math.isclose(other[step], value, rel_tol=1e-5), (stage, step, other[step], value)


def test_run_directory_contract(zero_runs):
    run_dir = zero_runs[2]
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if "loss" in r]
    for key in ("step", "loss", "lr", "grad_norm", "tokens_per_s", "mfu"):
        assert all(key in r for r in train_rows), key
    assert all(math.isfinite(r["grad_norm"]) for r in train_rows)
    assert [r["step"] for r in rows if "val_loss" in r] == [0, 5, 10]
    per_source = {k for r in rows for k in r if k.startswith("val_loss/")}
    assert {"val_loss/kowiki", "val_loss/nsmc"} <= per_source, per_source
    assert rows[-1]["elapsed_s"] > 0
    assert (run_dir / "config.yaml").read_text().count("zero_stage: 2") == 1
    tags = sorted(p.name for p in (run_dir / "checkpoints").glob("step_*"))
    assert tags == ["step_00000005", "step_00000010"]
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step_00000010"
    tag_dir = run_dir / "checkpoints" / "step_00000010"
    assert (tag_dir / "model.safetensors").is_file() and (tag_dir / "meta.json").is_file()
    assert list(tag_dir.glob("*optim_states.pt")), "DeepSpeed optimizer states"
    assert list((run_dir / "wandb").glob("offline-run-*")), "offline W&B run"
    for stage, other in zero_runs.items():
        assert (other / "checkpoints" / "latest").is_file(), stage


def test_zero0_grad_norm_matches_zero2(zero_runs):
    def norms(run_dir):
        return {
            r["step"]: r["grad_norm"]
            for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
            if "grad_norm" in r
        }

    a, b = norms(zero_runs[0]), norms(zero_runs[2])
    for step in a:
        assert math.isclose(a[step], b[step], rel_tol=1e-4), (step, a[step], b[step])


def test_resume_reproduces_uninterrupted_run(zero_runs, tiny_tokenizer, tiny_data, tmp_path):
    run_dir = tmp_path / "resumed"
    args = train_args(tiny_tokenizer, tiny_data, run_dir, "deepspeed.zero_stage=2", "train.exit_after_steps=4")
    torchrun_pretrain(*args)  # stops after step 4 with a checkpoint, as if preempted
    assert max(losses(run_dir)) == 4
    torchrun_pretrain(*args)  # the same command resumes: steps 5-8
    torchrun_pretrain(*args)  # steps 9-10
    assert losses(run_dir) == losses(zero_runs[2])  # exact, not approximate


def test_resume_with_another_model_shape_is_refused(zero_runs, tiny_tokenizer, tiny_data):
    run_dir = zero_runs[1]
    proc = run_module(
        "train.pretrain", *train_args(tiny_tokenizer, tiny_data, run_dir, "model.d_model=128"), check=False
    )
    assert proc.returncode != 0
    assert "another shape" in proc.stderr and "model.d_model: checkpoint 64, config 128" in proc.stderr


def test_zero3_offload_matches_zero0(zero_runs, tiny_tokenizer, tiny_data, tmp_path):
    """ZeRO-3 with parameters and optimizer states on CPU (DeepSpeedCPUAdam) follows the same trajectory."""
    run_dir = tmp_path / "offload"
    torchrun_pretrain(*train_args(tiny_tokenizer, tiny_data, run_dir, "deepspeed=zero3_offload"))
    ref, got = losses(zero_runs[0]), losses(run_dir)
    for step, value in ref.items():
        assert math.isclose(got[step], value, rel_tol=1e-4), (step, got[step], value)
