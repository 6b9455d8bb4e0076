"""launch.plan: parameter counts, memory per GPU, largest micro-batch, time and cost; DeepSeek-V3 sanity check."""

from __future__ import annotations

import json

import pytest
from hydra import compose, initialize_config_dir

from data_pipeline.cli import to_object_strict
from launch.plan import parse_tokens, plan
from tests.helpers import REPO, run_module


def make(*overrides: str):
    with initialize_config_dir(str(REPO / "configs"), version_base="1.3"):
        return to_object_strict(compose("plan", overrides=list(overrides)))


def test_deepseek_v3_published_figures():
    """671B total / ~37B activated, and ~180K H800 GPU-hours per trillion tokens at the MFU that implies."""
    # mfu given: time = FLOPs / (peak x mfu), the pre-issue-15 mode (the predicted time is in test_perf.py).
    v3 = ["model=deepseek_v3", "model.mtp.depth=0", "vocab_size=129280", "gpus=2048", "gpu=h800", "tokens=1T"]
    v3.append("mfu=0.4")
    cfg = make(*v3)
    p = plan(cfg)
    assert p["params_total"] == pytest.approx(671e9, rel=0.005)
    assert p["params_activated"] == pytest.approx(37e9, rel=0.03)
    implied_mfu = p["gpu_hours"] * cfg.mfu / 180e3
    assert 0.35 < implied_mfu < 0.55  # DeepSeek-V3's FP8 run at a plausible utilisation of the bf16 peak
    again = plan(make(*v3, f"mfu={implied_mfu}"))
    assert again["gpu_hours"] == pytest.approx(180e3, rel=1e-6)


def test_zero_stages_shard_states_and_checkpointing_fits_more():
    base = ["model=llama_1b", "vocab_size=128256", "gpus=8", "gpu=h100", "seq_len=4096"]
    z = {s: plan(make(*base, f"deepspeed.zero_stage={s}"))["memory_gb"] for s in (0, 1, 2, 3)}
    assert z[0]["optimizer"] == pytest.approx(8 * z[1]["optimizer"])
    assert z[2]["gradients"] == pytest.approx(z[1]["gradients"] / 8)
    assert z[3]["weights"] == pytest.approx(z[2]["weights"] / 8)
    p = plan(make(*base, "deepspeed.zero_stage=1"))
    assert p["params_total"] == 1_235_814_400  # Llama-3.2-1B
    assert p["largest_micro_batch"]["full_checkpointing"] > p["largest_micro_batch"]["no_checkpointing"] >= 1
    off = plan(make(*base, "deepspeed=zero3_offload"))["memory_gb"]
    assert off["optimizer"] == 0 and off["weights"] == 0


def test_tokens_parse():
    assert parse_tokens("300B") == 300e9 and parse_tokens("1e12") == 1e12
    with pytest.raises(ValueError, match="tokens="):
        parse_tokens("lots")


def test_cli_prints_table_and_json():
    proc = run_module("launch.plan", "model=deepseek_1b_active", "gpus=1", "gpu=h100", "tokens=100B")
    assert "activated" in proc.stdout and "GPU-hours" in proc.stdout
    assert json.loads(proc.stdout.strip().splitlines()[-1])["params_activated"] > 0


def test_expert_parallel_memory_follows_deepspeed_partitioning():
    """ZeRO shards a rank's experts over the gpus / ep_size ranks holding the same experts, not over all gpus."""
    from launch.plan import state_bytes
    from model.config import ModelConfig, MoEConfig
    from train.config import DeepSpeedConfig

    counts = {"total": 1000, "routed_experts": 800}

    def per_gpu(ep_size: int, stage: int) -> dict:
        cfg = ModelConfig(moe=MoEConfig(enabled=True))
        return state_bytes(counts, DeepSpeedConfig(zero_stage=stage), cfg, gpus=8, fp32=True, ep_size=ep_size)

    assert per_gpu(2, 3) == per_gpu(1, 3)  # the expert shards per GPU are the same size either way
    assert per_gpu(2, 1)["weights"] == (200 + 800 / 2) * 4  # without ZeRO-3, EP halves the experts held
    assert per_gpu(2, 1)["optimizer"] == (200 / 8 + 400 / 4) * 8


def test_loss_impl_and_checkpointing_mode_change_activations():
    """The fused/chunked loss drops the per-token logits term; selective checkpointing sits between none and full;
    the configured mode decides the micro-batch and the total. H100 check in BENCHMARKS.md."""
    base = ["model=llama_1b", "vocab_size=128256", "gpus=1", "gpu=h100", "seq_len=4096", "deepspeed.zero_stage=0"]
    plain = plan(make(*base))
    fused = plan(make(*base, "execution.loss_impl=chunked"))
    sel = plan(make(*base, "execution.loss_impl=liger", "execution.activation_checkpointing=selective"))
    m, f, s = plain["memory_gb"], fused["memory_gb"], sel["memory_gb"]
    logits_gb = 4096 * 10 * 128256 / 1e9  # bf16 logits + fp32 copy + fp32 gradient per sequence
    assert m["activations_per_micro_batch"] - f["activations_per_micro_batch"] == pytest.approx(
        logits_gb - 8 * 128256 * 4096 / 1e9
    )
    assert f["activations_per_micro_batch_checkpointed"] < s["activations_per_micro_batch"]
    assert s["activations_per_micro_batch"] < f["activations_per_micro_batch"]
    assert (
        s["activation_checkpointing"] == "selective"
        and s["activations_per_micro_batch"] == s["activations_per_micro_batch_selective"]
    )
    big = sel["largest_micro_batch"]
    assert big["no_checkpointing"] < big["selective_checkpointing"] < big["full_checkpointing"]
    assert s["micro_batch_size"] == big["selective_checkpointing"]
