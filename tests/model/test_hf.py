"""Export to Hugging Face Llama and reload with AutoModelForCausalLM: same logits as our model (fp32, CPU)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
import transformers
from omegaconf import OmegaConf

from model.config import ModelConfig
from model.hf import hf_llama_config, save_hf_model, to_hf_state_dict
from model.transformer import Transformer

TINY = Path(__file__).resolve().parents[2] / "configs" / "model" / "tiny.yaml"


def tiny_cfg(tie: bool) -> ModelConfig:
    cfg = ModelConfig(**OmegaConf.to_container(OmegaConf.load(TINY)))
    # A non-default rope_theta on the untied variant, so a dropped theta would show up as a logit mismatch.
    return dataclasses.replace(cfg, vocab_size=512, tie_embeddings=tie, rope_theta=10000.0 if tie else 500000.0)


def train_a_little(model: Transformer, steps: int = 3) -> None:
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for _ in range(steps):
        x = torch.randint(model.cfg.vocab_size, (2, 33))
        model(x[:, :-1], labels=x[:, 1:]).ce_loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)


@pytest.mark.parametrize("trained", [False, True], ids=["init", "trained"])
@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
def test_export_reload_matches_logits(tmp_path, tie, trained):
    cfg = tiny_cfg(tie)
    torch.manual_seed(0)
    model = Transformer(cfg)
    if trained:
        train_a_little(model)
    model.eval()

    save_hf_model(tmp_path, model.state_dict(), cfg, bos_id=1, eos_id=2, pad_id=0)
    assert {"config.json", "generation_config.json", "model.safetensors"} <= {p.name for p in tmp_path.iterdir()}
    gen = json.loads((tmp_path / "generation_config.json").read_text())
    assert (gen["bos_token_id"], gen["eos_token_id"], gen["pad_token_id"]) == (1, 2, 0)

    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert isinstance(hf, transformers.LlamaForCausalLM)
    assert hf.dtype == torch.float32
    assert (hf.lm_head.weight is hf.model.embed_tokens.weight) == tie

    x = torch.randint(cfg.vocab_size, (2, 48))
    with torch.no_grad():
        ours, theirs = model(x).logits, hf(x).logits
    assert (ours - theirs).abs().max().item() <= 1e-4


def test_config_fields():
    cfg = tiny_cfg(tie=False)
    hf_cfg = hf_llama_config(cfg, bos_id=3, eos_id=4, pad_id=5)
    assert (hf_cfg.hidden_size, hf_cfg.num_hidden_layers, hf_cfg.intermediate_size) == (256, 4, 704)
    assert (hf_cfg.num_attention_heads, hf_cfg.num_key_value_heads, hf_cfg.head_dim) == (4, 2, 64)
    assert hf_cfg.rope_parameters["rope_theta"] == 500000.0 and hf_cfg.max_position_embeddings == 1024
    assert not hf_cfg.attention_bias and not hf_cfg.mlp_bias and hf_cfg.hidden_act == "silu"
    assert hf_cfg.dtype == torch.float32 and hf_cfg.tie_word_embeddings is False
    assert (hf_cfg.bos_token_id, hf_cfg.eos_token_id, hf_cfg.pad_token_id) == (3, 4, 5)


@pytest.mark.parametrize("tie", [True, False], ids=["tied", "untied"])
def test_state_dict_names_map_one_to_one(tie):
    cfg = tiny_cfg(tie)
    with torch.device("meta"):
        ours = Transformer(cfg).state_dict()
        theirs = transformers.LlamaForCausalLM(hf_llama_config(cfg, bos_id=1, eos_id=2, pad_id=0)).state_dict()
    mapped = to_hf_state_dict(ours, cfg)
    expected = set(theirs) - ({"lm_head.weight"} if tie else set())
    assert set(mapped) == expected
    assert all(mapped[k].shape == theirs[k].shape for k in mapped)


def test_export_takes_checkpoint_style_state_dict(tmp_path):
    """A bf16 state dict without the tied lm_head (as a checkpoint may hold it) still exports as fp32."""
    cfg = tiny_cfg(tie=True)
    torch.manual_seed(0)
    model = Transformer(cfg).eval()
    sd = {k: v.to(torch.bfloat16) for k, v in model.state_dict().items() if k != "lm_head.weight"}
    save_hf_model(tmp_path, sd, cfg, bos_id=1, eos_id=2, pad_id=0)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path)
    assert hf.dtype == torch.float32
    torch.testing.assert_close(hf.model.embed_tokens.weight, sd["embed_tokens.weight"].float(), atol=0, rtol=0)


def test_negative_special_id_is_rejected():
    with pytest.raises(ValueError, match="pad_id=-1"):
        hf_llama_config(tiny_cfg(tie=True), bos_id=1, eos_id=2, pad_id=-1)
