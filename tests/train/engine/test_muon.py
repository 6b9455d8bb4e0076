"""Muon (optim=muon): which tensors get Muon, the single-process update against torch.optim.Muon, per-expert
orthogonalization, checkpoint state; the distributed update (ZeRO 0-3, expert and tensor parallelism) against a
single-process reference on real gloo ranks (tests/train/engine/muon_worker.py)."""

from __future__ import annotations

import math

import pytest
import torch

from model.config import ModelConfig, MoEConfig, MTPConfig
from model.transformer import Transformer
from tests.helpers import run_module
from train.config import MuonConfig, OptimConfig
from train.engine.muon import MuonAdamW, build_muon_optimizer, check_optimizer, orthogonalize, split_params


def names(model):
    muon, adam = split_params(model)
    return {n for n, _, _ in muon}, {n for n, _ in adam}


def test_dense_split():
    cfg = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden=48)
    muon, adam = names(Transformer(cfg))
    per_layer = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
                 "mlp.up_proj", "mlp.down_proj"]  # fmt: skip
    assert muon == {f"layers.{i}.{m}.weight" for i in range(2) for m in per_layer}
    # tied output head = the embedding, listed once
    assert adam == {"embed_tokens.weight", "norm.weight"} | {
        f"layers.{i}.{n}.weight" for i in range(2) for n in ("input_layernorm", "post_attention_layernorm")
    }


def test_mla_moe_mtp_split():
    moe = MoEConfig(enabled=True, n_routed_experts=4, top_k=2, ffn_hidden=16, n_shared_experts=1, first_k_dense=1)
    cfg = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=2, n_kv_heads=2, ffn_hidden=48, attention="mla",
                      q_lora_rank=24, kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8,
                      tie_embeddings=False, moe=moe, mtp=MTPConfig(depth=1))  # fmt: skip
    model = Transformer(cfg)
    muon, adam = names(model)
    attn = ["q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj"]
    moe_mats = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj", "mlp.shared_experts.gate_proj.weight",
                "mlp.shared_experts.up_proj.weight", "mlp.shared_experts.down_proj.weight"]  # fmt: skip
    want = {f"layers.{i}.self_attn.{a}.weight" for i in range(2) for a in attn}
    want |= {f"layers.0.mlp.{m}.weight" for m in ("gate_proj", "up_proj", "down_proj")}  # first_k_dense
    want |= {f"layers.1.{m}" for m in moe_mats}
    want |= {"mtp.0.eh_proj.weight"} | {f"mtp.0.block.self_attn.{a}.weight" for a in attn}
    want |= {f"mtp.0.block.{m}" for m in moe_mats}
    assert muon == want
    assert {"embed_tokens.weight", "lm_head.weight", "layers.1.mlp.gate.weight", "mtp.0.block.mlp.gate.weight",
            "layers.0.self_attn.kv_a_layernorm.weight", "layers.0.self_attn.q_a_layernorm.weight",
            "mtp.0.hnorm.weight", "mtp.0.enorm.weight", "mtp.0.norm.weight"} <= adam  # fmt: skip
    assert not muon & adam
    assert len(muon) + len(adam) == len(list(model.parameters()))
    specs = {n: s for n, _, s in split_params(model)[0]}
    assert specs["layers.1.mlp.experts.gate_up_proj"] == (8, 16, 32)  # 4 experts x [gate; up], each (16, 32)
    assert specs["layers.1.mlp.experts.down_proj"] == (4, 32, 16)
    groups = build_muon_optimizer(model, OptimConfig(name="muon", lr=1e-3), torch.device("cpu")).param_groups
    assert [(g["name"], g["use_muon"]) for g in groups] == [("decay", False), ("no_decay", False), ("muon", True)]
    assert {id(p) for p in groups[1]["params"]} == {id(p) for n, p in model.named_parameters() if p.ndim == 1}


def test_single_process_update_equals_torch_muon():
    """Dense 2-D weights, bf16 Newton-Schulz as torch.optim.Muon does it, Moonlight's lr adjustment."""
    torch.manual_seed(0)
    shapes = [(24, 40), (40, 24), (32, 32)]
    ours = [torch.nn.Parameter(torch.randn(s)) for s in shapes]
    ref = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    optim = OptimConfig(name="muon", lr=0.02, weight_decay=0.1, muon=MuonConfig(ns_dtype="bf16"))
    opt = MuonAdamW([{"params": ours, "use_muon": True}], {id(p): (1, *p.shape) for p in ours}, optim,
                    torch.bfloat16)  # fmt: skip
    torch_opt = torch.optim.Muon(ref, lr=0.02, weight_decay=0.1, momentum=0.95, nesterov=True,
                                 adjust_lr_fn="match_rms_adamw")  # fmt: skip
    for _ in range(3):
        for a, b in zip(ours, ref, strict=True):
            g = torch.randn(a.shape)
            a.grad, b.grad = g.clone(), g.clone()
        opt.step()
        torch_opt.step()
    for a, b in zip(ours, ref, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=2e-3)  # bf16 matmuls, batched vs not
        assert a.sub(b).abs().max() < 0.02 * 0.2 * math.sqrt(40) * 0.05  # a small part of one step's update


def test_experts_are_orthogonalized_one_by_one():
    torch.manual_seed(0)
    E, h, d = 3, 6, 10
    gate_up = torch.randn(E, 2 * h, d)
    out = orthogonalize(gate_up.view(2 * E, h, d), (3.4445, -4.7750, 2.0315), 5, 1e-7, torch.float32)
    for e in range(E):
        for part in range(2):
            alone = orthogonalize(gate_up[e, part * h : (part + 1) * h][None], (3.4445, -4.7750, 2.0315), 5, 1e-7,
                                  torch.float32)  # fmt: skip
            torch.testing.assert_close(out.view(E, 2 * h, d)[e, part * h : (part + 1) * h], alone[0])
    # roughly orthogonal rows: singular values in Newton-Schulz's band around 1, not the raw spread
    s = torch.linalg.svdvals(out[0])
    assert s.min() > 0.5 and s.max() < 1.3


def test_state_dict_carries_momentum_under_adam_keys():
    p = torch.nn.Parameter(torch.randn(8, 12))
    optim = OptimConfig(name="muon", muon=MuonConfig(ns_dtype="fp32"))
    opt = MuonAdamW([{"params": [p], "use_muon": True}], {id(p): (1, 8, 12)}, optim, torch.float32)
    p.grad = torch.randn_like(p)
    opt.step()
    sd = opt.state_dict()
    assert set(sd["state"][0]) == {"step", "exp_avg", "exp_avg_sq"} and sd["state"][0]["exp_avg_sq"].abs().sum() == 0
    assert "exp_avg_sq" not in opt.state[p]  # only in the saved copy
    again = MuonAdamW([{"params": [p], "use_muon": True}], {id(p): (1, 8, 12)}, optim, torch.float32)
    again.load_state_dict(sd)
    p.grad = torch.randn_like(p)
    again.step()
    assert set(again.state[p]) == {"step", "exp_avg"}


@pytest.mark.parametrize(
    ("name", "stage", "offload", "bf16", "tp", "message"),
    [
        ("muon", 2, True, False, 1, "offload_optimizer"),
        ("muon", 1, False, True, 1, "bf16 and deepspeed.zero_stage=1"),
        ("adamw", 0, False, True, 1, "qk_clip"),
    ],
)
def test_unsupported_combinations_are_refused(name, stage, offload, bf16, tp, message):
    optim = OptimConfig(name=name)
    optim.qk_clip.enabled = True
    with pytest.raises(ValueError, match=message):
        check_optimizer(optim, stage, offload, bf16, tp)


@pytest.mark.parametrize(
    ("name", "tp", "sp", "pp", "qk_norm", "message"),
    [
        ("muon", 1, 1, 2, False, "pipeline parallelism"),
        ("adamw", 1, 2, 1, False, r"sequence parallelism \(sp_size=2\)"),
        ("adamw", 1, 1, 1, True, "qk_norm"),
    ],
)
def test_layouts_qk_clip_cannot_see_are_refused(name, tp, sp, pp, qk_norm, message):
    optim = OptimConfig(name=name)
    optim.qk_clip.enabled = True
    with pytest.raises(ValueError, match=message):
        check_optimizer(optim, 2, False, False, tp, sp, pp, qk_norm)


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_muon_and_qk_clip_with_tensor_parallelism_are_accepted(stage):
    optim = OptimConfig(name="muon")
    optim.qk_clip.enabled = True
    check_optimizer(optim, stage, False, False, tp_size=2)


def test_unknown_optimizer_is_refused():
    with pytest.raises(ValueError, match="adamw"):
        OptimConfig(name="sgd")


def muon_worker(*args: str, nproc: int = 2) -> str:
    cmd = ("torchrun", "--standalone", f"--nproc_per_node={nproc}", "-m", "tests.train.engine.muon_worker", *args)
    return run_module(*cmd, timeout=400).stdout


@pytest.mark.slow
@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_distributed_muon_matches_single_process_reference(stage):
    assert f"OK {stage} 1" in muon_worker(str(stage))


@pytest.mark.slow
@pytest.mark.parametrize("stage", [1, 2, 3])
def test_expert_parallel_muon_matches_single_process_reference(stage):
    assert f"OK {stage} 2" in muon_worker(str(stage), "2")


@pytest.mark.slow
@pytest.mark.parametrize(("nproc", "stage"), [(2, 1), (2, 2), (2, 3), (4, 2)])
def test_tensor_parallel_muon_orthogonalizes_whole_matrices(nproc, stage):
    """TP=2 (and TP=2 x DP=2 on 4 ranks): each rank's slice of a matrix gets its slice of the whole matrix's
    update, as the single-process reference computes it."""
    assert f"OK tp {stage} {nproc}" in muon_worker(str(stage), "1", "tp", nproc=nproc)


@pytest.mark.slow
def test_a_rank_that_orthogonalizes_no_matrix_still_gets_its_slice():
    assert "OK slice 2" in muon_worker("0", "1", "slice")
