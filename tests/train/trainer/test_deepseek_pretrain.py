"""Real 2-process runs of model=deepseek_tiny on CPU (gloo): ZeRO 0-3 parity, metrics, resume, export to HF."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import transformers

from tests.helpers import STEPS, run_module, stopped_at, torchrun_pretrain, train_args
from tests.train.trainer.test_pretrain import losses

DEEPSEEK = ("model=deepseek_tiny", "model.n_layers=3", "model.max_seq_len=256")


def ds_args(tok: Path, data: Path, run_dir: Path, *extra: str) -> list[str]:
    return [a for a in train_args(tok, data, run_dir, *extra) if a != "model=nano"] + list(DEEPSEEK)


@pytest.fixture(scope="module")
def ds_runs(tiny_tokenizer, tiny_data, tmp_path_factory) -> dict[int, Path]:
    root = tmp_path_factory.mktemp("deepseek")
    runs = {}
    for stage in (0, 1, 2, 3):
        runs[stage] = root / f"zero{stage}"
        torchrun_pretrain(*ds_args(tiny_tokenizer, tiny_data, runs[stage], f"deepspeed.zero_stage={stage}"))
    return runs


def rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_moe_mla_mtp_trains_identically_under_zero_0_to_3(ds_runs):
    ref = losses(ds_runs[0])
    assert sorted(ref) == list(range(1, STEPS + 1)) and ref[STEPS] < ref[1]
    for stage in (1, 2, 3):
        other = losses(ds_runs[stage])
        for step, value in ref.items():
            assert math.isclose(other[step], value, rel_tol=1e-5), (stage, step, other[step], value)
    # The balancing biases (moved by all-reduced loads after every step) end identical too.
    biases = [_bias(r) for r in ds_runs.values()]
    for b in biases[1:]:
        torch.testing.assert_close(b, biases[0], atol=0, rtol=0)
    assert biases[0].abs().max() > 0


def _bias(run_dir: Path) -> torch.Tensor:
    from train.checkpoint.weights import load_full_weights

    state, _ = load_full_weights(run_dir)
    return torch.stack([v for k, v in sorted(state.items()) if k.endswith("e_score_correction_bias")])


@pytest.mark.slow
def test_moe_and_mtp_metrics_are_logged(ds_runs):
    train_rows = [r for r in rows(ds_runs[2]) if "loss" in r]
    for r in train_rows:
        assert r["moe_max_violation"] >= 0 and math.isfinite(r["mtp_loss"]) and r["aux_loss"] > 0
        assert 0 < r["mfu"] and math.isfinite(r["loss"])
    assert [r["step"] for r in rows(ds_runs[2]) if "val_loss" in r] == [0, 5, 10]


@pytest.mark.slow
def test_resume_reproduces_uninterrupted_run(ds_runs, tiny_tokenizer, tiny_data, tmp_path):
    run_dir = tmp_path / "resumed"
    args = ds_args(tiny_tokenizer, tiny_data, run_dir, "deepspeed.zero_stage=2", "train.exit_after_steps=5")
    torchrun_pretrain(*args)
    torchrun_pretrain(*args)  # restores weights, optimizer, and the balancing biases (module buffers)
    assert losses(run_dir) == losses(ds_runs[2])


@pytest.mark.slow
def test_resume_with_other_expert_count_is_refused(ds_runs, tiny_tokenizer, tiny_data):
    args = ds_args(tiny_tokenizer, tiny_data, ds_runs[1], "model.moe.n_routed_experts=4")
    proc = run_module("train.pretrain", *args, check=False)
    assert proc.returncode != 0
    assert "model.moe.n_routed_experts: checkpoint 8, config 4" in proc.stderr


@pytest.mark.slow
def test_export_of_trained_run_matches_logits(ds_runs, tmp_path):
    from train.checkpoint.weights import load_model

    out = tmp_path / "hf"
    proc = run_module("train.export", f"run.dir={ds_runs[3]}", f"out={out}")
    assert json.loads(proc.stdout.strip().splitlines()[-1])["architecture"] == "DeepseekV3ForCausalLM"
    ours, _ = load_model(ds_runs[3])
    hf = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(hf).__name__ == "DeepseekV3ForCausalLM"
    x = torch.randint(ours.cfg.vocab_size, (2, 64))
    with torch.no_grad():
        assert (ours(x).logits - hf(x).logits).abs().max().item() <= 1e-4


# Expert parallelism: the same runs with the 8 routed experts sharded over the 2 ranks (4 each).
EP = "model.moe.ep_size=2"


@pytest.fixture(scope="module")
def ep_runs(tiny_tokenizer, tiny_data, tmp_path_factory) -> dict[int, Path]:
    root = tmp_path_factory.mktemp("deepseek_ep")
    runs = {}
    for stage in (2, 3):
        runs[stage] = root / f"ep2_zero{stage}"
        torchrun_pretrain(*ds_args(tiny_tokenizer, tiny_data, runs[stage], f"deepspeed.zero_stage={stage}", EP))
    return runs


@pytest.mark.slow
def test_expert_parallel_trains_like_ep1(ds_runs, ep_runs):
    from train.checkpoint.weights import load_full_weights

    for stage, run in ep_runs.items():
        ref, ep = rows(ds_runs[stage]), rows(run)
        for a, b in zip(ref, ep, strict=True):
            if "loss" in a:  # every step: loss, clipped-gradient norm, routing imbalance
                assert math.isclose(b["loss"], a["loss"], rel_tol=1e-5), (stage, a["step"], a["loss"], b["loss"])
                assert math.isclose(b["grad_norm"], a["grad_norm"], rel_tol=1e-4), (stage, a["step"])
                assert b["moe_max_violation"] == a["moe_max_violation"]
        torch.testing.assert_close(_bias(run), _bias(ds_runs[stage]), atol=0, rtol=0)
        # Checkpoint weights hold every expert, in global order, as the ep_size=1 run's do.
        full, meta = load_full_weights(run)
        ref_full, _ = load_full_weights(ds_runs[stage])
        assert meta["ep_size"] == 2 and full.keys() == ref_full.keys()
        for key, value in ref_full.items():
            torch.testing.assert_close(full[key], value, atol=1e-5, rtol=0)


@pytest.mark.slow
def test_expert_parallel_run_exports_the_ep1_model(ds_runs, ep_runs, tmp_path):
    from safetensors.torch import load_file

    outs = {}
    for name, run in (("ep1", ds_runs[3]), ("ep2", ep_runs[3])):
        outs[name] = tmp_path / name
        run_module("train.export", f"run.dir={run}", f"out={outs[name]}")
    configs = [json.loads((outs[n] / "config.json").read_text()) for n in ("ep1", "ep2")]
    assert configs[0] == configs[1]
    ep1, ep2 = (load_file(str(outs[n] / "model.safetensors")) for n in ("ep1", "ep2"))
    assert ep1.keys() == ep2.keys()
    for key, value in ep1.items():
        torch.testing.assert_close(ep2[key], value, atol=1e-5, rtol=0)


@pytest.mark.slow
def test_expert_parallel_resume_reproduces_uninterrupted_run(ep_runs, tiny_tokenizer, tiny_data, tmp_path):
    run_dir = stopped_at(ep_runs[2], tmp_path / "resumed", 5)
    torchrun_pretrain(*ds_args(tiny_tokenizer, tiny_data, run_dir, "deepspeed.zero_stage=2", EP))
    assert losses(run_dir) == losses(ep_runs[2])


@pytest.mark.slow
def test_resume_with_other_ep_size(ep_runs, tiny_tokenizer, tiny_data, tmp_path):
    """ep_size 2 -> 1 on one rank: a ZeRO-2 checkpoint is resharded through the universal checkpoint (every expert in
    it) and the losses continue within 1e-5; a ZeRO-3 one is refused in one line (its expert partitions are not
    merged)."""
    run_dir = stopped_at(ep_runs[2], tmp_path / "resumed", 5)
    proc = run_module("train.pretrain", *ds_args(tiny_tokenizer, tiny_data, run_dir, "deepspeed.zero_stage=2"))
    assert "converting it to" in proc.stderr
    got, want = losses(run_dir), losses(ep_runs[2])
    assert sorted(got) == sorted(want)
    for step in range(6, 11):
        assert math.isclose(got[step], want[step], rel_tol=1e-5), (step, got[step], want[step])
    proc = run_module("train.pretrain", *ds_args(tiny_tokenizer, tiny_data, ep_runs[3], "deepspeed.zero_stage=3"),
                      check=False)  # fmt: skip
    assert proc.returncode != 0
    assert "another expert-parallel degree is resharded from ZeRO-1/2 files" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_ep_size_must_divide_the_world_size(tiny_tokenizer, tiny_data, tmp_path):
    proc = run_module("train.pretrain", *ds_args(tiny_tokenizer, tiny_data, tmp_path / "run", EP), check=False)
    assert proc.returncode != 0
    assert "model.moe.ep_size=2 must divide the number of ranks (1)" in proc.stderr
