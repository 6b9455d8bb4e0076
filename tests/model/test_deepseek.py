"""CPU unit tests of the DeepSeek-style parts: MLA, routing, aux-free balancing, MoE, MTP, FLOPs, shipped shapes."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from model.attention import MLAttention
from model.config import ExecutionConfig, ModelConfig, MoEConfig, MTPConfig
from model.flops import activated_params, flops_per_token
from model.moe import MoE, Router, max_violation, sequence_balance_loss
from model.rope import RotaryEmbedding
from model.transformer import Transformer, num_params

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "model"


def ds_cfg(**overrides) -> ModelConfig:
    base = dict(
        vocab_size=128, d_model=64, n_layers=3, n_heads=4, n_kv_heads=4, ffn_hidden=96, max_seq_len=64,
        attention="mla", kv_lora_rank=24, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=12,
        moe=MoEConfig(enabled=True, n_routed_experts=8, n_shared_experts=1, top_k=2, ffn_hidden=32, first_k_dense=1,
                      n_group=2, topk_group=1),
        mtp=MTPConfig(depth=1),
    )  # fmt: skip
    return ModelConfig(**(base | overrides))


def naive_mla(attn: MLAttention, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Per-head loops over the DeepSeek-V2 equations, with RoPE written out on (first half, second half) pairs."""
    B, T, _ = x.shape
    H, dn, dr, dv = attn.n_heads, attn.nope, attn.rope, attn.v_dim

    def rope(t):  # t (..., T, dr)
        t1, t2 = t[..., : dr // 2], t[..., dr // 2 :]
        c, s = cos[:, : dr // 2], sin[:, : dr // 2]
        return torch.cat((t1 * c - t2 * s, t2 * c + t1 * s), dim=-1)

    q_all = attn.q_proj(x) if attn.q_lora_rank is None else attn.q_b_proj(attn.q_a_layernorm(attn.q_a_proj(x)))
    ckv = attn.kv_a_proj_with_mqa(x)
    c, kr = ckv[..., : attn.kv_lora_rank], rope(ckv[..., attn.kv_lora_rank :])
    kv = attn.kv_b_proj(attn.kv_a_layernorm(c))
    heads = []
    for h in range(H):
        q = q_all[..., h * (dn + dr) : (h + 1) * (dn + dr)]
        q = torch.cat((q[..., :dn], rope(q[..., dn:])), -1)
        kvh = kv[..., h * (dn + dv) : (h + 1) * (dn + dv)]
        k, v = torch.cat((kvh[..., :dn], kr), -1), kvh[..., dn:]
        s = q @ k.transpose(-1, -2) / math.sqrt(dn + dr)
        s = s.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
        heads.append(s.softmax(-1) @ v)
    return attn.o_proj(torch.cat(heads, -1))


@pytest.mark.parametrize("q_lora_rank", [None, 20])
@pytest.mark.parametrize("backend", ["sdpa", "eager"])
def test_mla_matches_naive_reference(q_lora_rank, backend):
    cfg = ds_cfg(q_lora_rank=q_lora_rank)
    torch.manual_seed(0)
    attn = MLAttention(cfg, backend)
    for p in attn.parameters():
        torch.nn.init.normal_(p, std=0.2)
    cos, sin = RotaryEmbedding(cfg.qk_rope_head_dim, 64, 10000.0)(20)
    x = torch.randn(2, 20, cfg.d_model)
    with torch.no_grad():
        torch.testing.assert_close(attn(x, cos, sin), naive_mla(attn, x, cos, sin), atol=1e-5, rtol=1e-5)
    names = {n for n, _ in attn.named_parameters()}
    assert ("q_proj.weight" in names) == (q_lora_rank is None)
    assert attn.kv_a_proj_with_mqa.weight.shape == (cfg.kv_lora_rank + 8, 64)
    assert attn.kv_b_proj.weight.shape == (4 * (16 + 12), cfg.kv_lora_rank)


def test_router_topk_gate_normalisation_and_scale():
    cfg = MoEConfig(enabled=True, n_routed_experts=8, top_k=3, route_scale=2.5)
    r = Router(16, cfg)
    torch.nn.init.normal_(r.weight)
    x = torch.randn(50, 16)
    scores, idx, gates = r(x)
    torch.testing.assert_close(scores, torch.sigmoid(x @ r.weight.T))
    assert torch.equal(idx.sort(-1)[0], scores.topk(3, -1)[1].sort(-1)[0])
    torch.testing.assert_close(gates.sum(-1), torch.full((50,), 2.5))
    torch.testing.assert_close(gates, scores.gather(1, idx) / scores.gather(1, idx).sum(-1, keepdim=True) * 2.5)


def test_bias_steers_selection_but_not_gates():
    cfg = MoEConfig(enabled=True, n_routed_experts=4, top_k=1)
    r = Router(8, cfg)
    torch.nn.init.normal_(r.weight)
    x = torch.randn(30, 8)
    r.e_score_correction_bias[2] = 10.0  # expert 2 always selected...
    scores, idx, gates = r(x)
    assert (idx == 2).all()
    torch.testing.assert_close(gates, torch.ones(30, 1))  # ...but its gate is its normalised affinity, not the bias


def test_group_limited_routing():
    cfg = MoEConfig(enabled=True, n_routed_experts=8, top_k=2, n_group=4, topk_group=2)
    r = Router(8, cfg)
    torch.nn.init.normal_(r.weight)
    x = torch.randn(200, 8)
    scores, idx, _ = r(x)
    groups = scores.view(200, 4, 2).topk(2, -1)[0].sum(-1).topk(2, -1)[1]  # (N, 2) allowed groups
    assert all(set((idx[n] // 2).tolist()) <= set(groups[n].tolist()) for n in range(200))
    masked = scores.view(200, 4, 2).clone()
    keep = torch.zeros(200, 4, dtype=torch.bool).scatter_(1, groups, True)
    masked[~keep] = -1
    assert torch.equal(idx.sort(-1)[0], masked.view(200, 8).topk(2, -1)[1].sort(-1)[0])


def test_bias_update_reduces_imbalance_on_skewed_router():
    torch.manual_seed(0)
    cfg = MoEConfig(enabled=True, n_routed_experts=8, top_k=2)
    r = Router(16, cfg)
    torch.nn.init.normal_(r.weight, std=0.1)
    x = torch.randn(1024, 16) + 2.0 * r.weight[0] / r.weight[0].norm()  # skew toward expert 0
    x = x + torch.linspace(0, 1.5, 8) @ r.weight / 8  # and a ramp over the others

    def load():
        return torch.bincount(r(x)[1].flatten(), minlength=8).float()[None]

    before = max_violation(load())
    for _ in range(300):
        r.update_bias(load()[0], gamma=0.01)
    after = max_violation(load())
    assert before > 0.5 and after < 0.25 * before, (before, after)


def test_sequence_balance_loss_is_one_when_uniform_and_larger_when_skewed():
    B, T, E, K = 2, 16, 4, 1
    uniform = torch.full((B, T, E), 0.5)
    idx = torch.arange(T).remainder(E).view(1, T, 1).expand(B, T, K)
    assert sequence_balance_loss(uniform, idx).item() == pytest.approx(1.0)
    skewed = uniform.clone()
    skewed[..., 0] = 0.99
    all_to_0 = sequence_balance_loss(skewed, torch.zeros(B, T, K, dtype=torch.long)).item()
    assert all_to_0 == pytest.approx(E * 0.99 / (0.99 + 3 * 0.5))  # f_0 = E, P_0 = its normalised affinity


@pytest.mark.parametrize("impl", ["grouped_mm", "loop"])
def test_moe_matches_dense_per_token_reference(impl):
    torch.manual_seed(0)
    cfg = MoEConfig(enabled=True, n_routed_experts=6, n_shared_experts=2, top_k=2, ffn_hidden=8)
    moe = MoE(16, cfg, expert_impl=impl)
    for p in moe.parameters():
        torch.nn.init.normal_(p, std=0.3)
    x = torch.randn(2, 5, 16)
    with torch.no_grad():
        y, load, _ = moe(x)
        _, idx, gates = moe.gate(x.view(-1, 16))
        ref = moe.shared_experts(x).view(-1, 16)
        for n in range(10):
            for k in range(2):
                e = idx[n, k]
                g, u = (moe.experts.gate_up_proj[e] @ x.view(-1, 16)[n]).chunk(2)
                ref[n] += gates[n, k] * (moe.experts.down_proj[e] @ (F.silu(g) * u))
    torch.testing.assert_close(y.view(-1, 16), ref, atol=1e-5, rtol=1e-5)
    assert load.sum().item() == 20


def test_mtp_loss_and_total_loss():
    torch.manual_seed(0)
    model = Transformer(ds_cfg())
    x = torch.randint(128, (2, 17))
    inp, labels = x[:, :-1], x[:, 1:]
    out = model(inp, labels)
    with torch.no_grad():  # MTP depth 1 by hand: h from the main trunk, embedding of token i+1, target token i+2
        cos, sin = model.rotary_emb(16)
        h = model.embed_tokens(inp)
        for layer in model.layers:
            h = layer(h, cos, sin)[0]
        m = model.mtp[0]
        h1 = m(h[:, :-1], model.embed_tokens(inp[:, 1:]), cos[:15], sin[:15])[0]
        ref = F.cross_entropy(model.lm_head(m.norm(h1)).flatten(0, 1), labels[:, 1:].flatten())
    torch.testing.assert_close(out.mtp_losses.mean(), ref)
    assert out.expert_loads.shape == (3, 8)  # 2 MoE decoder layers + the MTP block
    total = out.ce_loss + 0.3 * out.mtp_losses.mean() + 1e-4 * out.aux_losses.sum()  # as the trainer composes it
    total.backward()
    assert model.mtp[0].eh_proj.weight.grad is not None and model.layers[1].mlp.gate.weight.grad is not None
    model.eval()  # evaluation is the plain next-token loss
    with torch.no_grad():
        torch.testing.assert_close(model(inp, labels).ce_loss, out.ce_loss.detach(), atol=1e-3, rtol=0)


def test_bias_stays_fp32_and_is_in_state_dict():
    model = Transformer(ds_cfg()).to(torch.bfloat16)
    bias = model.layers[1].mlp.gate.e_score_correction_bias
    assert bias.dtype == torch.float32
    assert "layers.1.mlp.gate.e_score_correction_bias" in model.state_dict()
    for moe, load in zip(model.moe_layers(), torch.tensor([[1.0, 9, 1, 1, 1, 1, 1, 1]] * 3), strict=True):
        moe.gate.update_bias(load, gamma=1e-3)
    assert model.layers[1].mlp.gate.e_score_correction_bias[1].item() == pytest.approx(-1e-3)


def test_flops_count_activated_parameters():
    cfg = ds_cfg(vocab_size=1024)
    model = Transformer(cfg)
    # At seq_len 0 FLOPs are 6 x activated matmul weights: all minus inactive routed experts and norms/bias/embedding
    per_expert = 3 * cfg.d_model * cfg.moe.ffn_hidden
    inactive = 3 * (cfg.moe.n_routed_experts - cfg.moe.top_k) * per_expert  # 3 MoE blocks incl. MTP
    norms = sum(p.numel() for n, p in model.named_parameters() if "norm" in n)
    n_act = num_params(model, exclude_embeddings=True) - norms - inactive + cfg.vocab_size * cfg.d_model * 2
    assert activated_params(cfg) == n_act
    assert flops_per_token(cfg, 0) == pytest.approx(6 * n_act)
    attn = 2 * 2 * cfg.n_heads * (16 + 8 + 12) / 2 * 16 * 3 * (cfg.n_layers + 1)  # qk^T + pv, fwd+bwd, 4 layers
    assert flops_per_token(cfg, 16) - flops_per_token(cfg, 0) == pytest.approx(attn)


def load(name: str, **kw) -> ModelConfig:
    return dataclasses.replace(ModelConfig(**OmegaConf.to_container(OmegaConf.load(CONFIGS / f"{name}.yaml"))), **kw)


def test_deepseek_v2_lite_shape_has_published_size():
    cfg = load("deepseek_v2_lite", vocab_size=102400)
    with torch.device("meta"):
        model = Transformer(cfg)
    total = num_params(model)
    assert total == pytest.approx(15.7e9, rel=0.01), total  # DeepSeek-V2-Lite: 15.7B total, 2.4B activated
    assert activated_params(cfg) == pytest.approx(2.4e9, rel=0.03)  # matmul weights incl. the output head


def test_deepseek_1b_active_shape():
    cfg = load("deepseek_1b_active", vocab_size=32000)
    assert activated_params(cfg) == pytest.approx(1.0e9, rel=0.1)


@pytest.mark.parametrize("impl", ["grouped_mm", "loop"])
def test_expert_without_tokens_still_gets_a_gradient(impl):
    """Every expert weight takes part in every forward (empty slices included): no ZeRO-3 gather/reduce mismatch."""
    torch.manual_seed(0)
    moe = MoE(16, MoEConfig(enabled=True, n_routed_experts=4, top_k=1, ffn_hidden=8), expert_impl=impl)
    for p in moe.parameters():
        torch.nn.init.normal_(p, std=0.3)
    moe.gate.e_score_correction_bias[0] = 10.0  # every token goes to expert 0
    moe.train()
    y, load, _ = moe(torch.randn(2, 6, 16))
    y.sum().backward()
    assert load.tolist() == [12, 0, 0, 0]
    grad = moe.experts.gate_up_proj.grad
    assert grad is not None and grad[0].abs().sum() > 0 and grad[1:].abs().sum() == 0


def test_grouped_mm_and_loop_experts_agree_in_forward_and_backward():
    torch.manual_seed(0)
    moes = {}
    for impl in ("grouped_mm", "loop"):
        torch.manual_seed(0)
        moes[impl] = MoE(
            32,
            MoEConfig(enabled=True, n_routed_experts=8, n_shared_experts=1, top_k=3, ffn_hidden=16),
            expert_impl=impl,
        )
        for p in moes[impl].parameters():
            torch.nn.init.normal_(p, std=0.3)
    x = torch.randn(3, 7, 32)
    grads = {}
    for impl, moe in moes.items():
        xi = x.clone().requires_grad_()
        (moe(xi)[0] * torch.linspace(-1, 1, 32)).sum().backward()
        grads[impl] = [xi.grad] + [p.grad for p in moe.parameters()]
    for a, b in zip(grads["grouped_mm"], grads["loop"], strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_unknown_expert_impl_is_refused():
    with pytest.raises(ValueError, match="expert_impl"):
        ExecutionConfig(expert_impl="triton")
