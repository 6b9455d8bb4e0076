"""DeepSeek-style export: AutoModelForCausalLM loads DeepseekV3ForCausalLM with our logits (fp32, trained weights)."""

from __future__ import annotations

import json

import pytest
import torch
import transformers

from model.config import MoEConfig, MTPConfig
from model.hf import hf_deepseek_config, save_hf_model, to_hf_state_dict
from model.transformer import Transformer
from tests.helpers import one_thread  # noqa: F401  (autouse fixture)
from tests.model.test_deepseek import ds_cfg


def train_a_little(model: Transformer, steps: int = 5) -> None:
    """AdamW steps plus aux-free bias updates large enough to change routing, so the bias must round-trip."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(steps):
        x = torch.randint(model.cfg.vocab_size, (4, 33))
        out = model(x[:, :-1], labels=x[:, 1:])
        loss = out.ce_loss
        if out.mtp_losses is not None:
            loss = loss + 0.3 * out.mtp_losses.mean()
        if out.aux_losses is not None:
            loss = loss + 1e-4 * out.aux_losses.sum()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if model.cfg.moe.enabled:
            for moe, load in zip(model.moe_layers(), out.expert_loads, strict=True):
                moe.gate.update_bias(load, gamma=0.02)


VARIANTS = {
    "moe_mtp_tied": {},
    "q_lora_untied": dict(q_lora_rank=20, tie_embeddings=False, rope_theta=500000.0),
    "dense_mla": dict(moe=MoEConfig(enabled=False), mtp=MTPConfig(depth=0)),
    "no_shared_scaled": dict(
        moe=MoEConfig(enabled=True, n_routed_experts=8, n_shared_experts=0, top_k=3, ffn_hidden=32, route_scale=2.5)
    ),
}


@pytest.mark.parametrize("variant", VARIANTS)
def test_trained_export_matches_logits(tmp_path, variant):
    cfg = ds_cfg(**VARIANTS[variant])
    torch.manual_seed(0)
    model = Transformer(cfg)
    train_a_little(model)
    model.eval()
    save_hf_model(tmp_path, model.state_dict(), cfg, bos_id=1, eos_id=2, pad_id=0)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert isinstance(hf, transformers.DeepseekV3ForCausalLM) and hf.dtype == torch.float32
    if cfg.moe.enabled:
        ours = model.layers[1].mlp.gate.e_score_correction_bias
        assert ours.abs().max() >= 0.02  # trained bias, not zeros
        torch.testing.assert_close(hf.model.layers[1].mlp.gate.e_score_correction_bias, ours, atol=0, rtol=0)
    x = torch.randint(cfg.vocab_size, (2, 48))
    with torch.no_grad():
        assert (model(x).logits - hf(x).logits).abs().max().item() <= 1e-4


def test_state_dict_names_map_one_to_one():
    cfg = ds_cfg()
    with torch.device("meta"):
        ours = Transformer(cfg).state_dict()
        theirs = transformers.DeepseekV3ForCausalLM(hf_deepseek_config(cfg, bos_id=1, eos_id=2, pad_id=0)).state_dict()
    mapped = to_hf_state_dict(ours, cfg)
    assert not any("mtp" in k for k in mapped)  # training-only
    assert set(mapped) == set(theirs) - {"lm_head.weight"}
    assert all(mapped[k].shape == theirs[k].shape for k in mapped)


def test_config_fields():
    hf_cfg = hf_deepseek_config(ds_cfg(q_lora_rank=20), bos_id=1, eos_id=2, pad_id=0)
    mla = (hf_cfg.kv_lora_rank, hf_cfg.q_lora_rank, hf_cfg.qk_nope_head_dim, hf_cfg.qk_rope_head_dim)
    assert mla == (24, 20, 16, 8)
    assert (hf_cfg.n_routed_experts, hf_cfg.num_experts_per_tok, hf_cfg.n_group, hf_cfg.topk_group) == (8, 2, 2, 1)
    assert hf_cfg.first_k_dense_replace == 1 and hf_cfg.norm_topk_prob and not hf_cfg.rope_interleave
    assert json.loads(hf_cfg.to_json_string())["model_type"] == "deepseek_v3"


def test_gqa_moe_export_is_refused(tmp_path):
    with pytest.raises(ValueError, match="model.attention=mla"):
        save_hf_model(tmp_path, {}, ds_cfg(attention="gqa"), bos_id=1, eos_id=2, pad_id=0)
