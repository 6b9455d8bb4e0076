"""CPU unit tests of the decoder: kernels agree, causality, loss, GQA, init, FLOPs, shipped model configs."""

from __future__ import annotations

import dataclasses
import importlib.util
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from model.attention import FlashAttnUnavailableError
from model.config import ExecutionConfig, ModelConfig
from model.flops import flops_per_token
from model.transformer import Transformer, num_params

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "model"


def make_cfg(**overrides) -> ModelConfig:
    base = dict(vocab_size=128, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden=96, max_seq_len=64)
    return ModelConfig(**(base | overrides))


def build(cfg: ModelConfig, seed: int = 0, **execution) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(cfg, ExecutionConfig(**execution)).eval()


@pytest.mark.parametrize("n_kv_heads", [4, 2, 1])
def test_sdpa_matches_eager(n_kv_heads):
    sdpa = build(make_cfg(n_kv_heads=n_kv_heads), attn_backend="sdpa")
    eager = build(make_cfg(n_kv_heads=n_kv_heads), attn_backend="eager")
    eager.load_state_dict(sdpa.state_dict())
    x = torch.randint(128, (3, 40))
    with torch.no_grad():
        torch.testing.assert_close(sdpa(x).logits, eager(x).logits, atol=1e-5, rtol=0)


@pytest.mark.parametrize("n_kv_heads", [4, 1])
def test_gqa_projection_shapes(n_kv_heads):
    cfg = make_cfg(n_kv_heads=n_kv_heads)
    attn = build(cfg).layers[0].self_attn
    assert attn.q_proj.weight.shape == (cfg.n_heads * cfg.head_dim, cfg.d_model)
    assert attn.k_proj.weight.shape == attn.v_proj.weight.shape == (n_kv_heads * cfg.head_dim, cfg.d_model)
    assert attn.o_proj.weight.shape == (cfg.d_model, cfg.n_heads * cfg.head_dim)


@pytest.mark.parametrize("backend", ["sdpa", "eager"])
def test_causal(backend):
    model = build(make_cfg(), attn_backend=backend)
    x = torch.randint(128, (2, 32))
    t = 17
    x2 = x.clone()
    x2[:, t] = (x[:, t] + 1) % 128
    with torch.no_grad():
        a, b = model(x).logits, model(x2).logits
    torch.testing.assert_close(a[:, :t], b[:, :t], atol=1e-6, rtol=0)
    assert (a[:, t:] - b[:, t:]).abs().amax() > 1e-4


def test_loss_is_cross_entropy_over_unmasked_labels():
    model = build(make_cfg())
    x = torch.randint(128, (2, 24))
    labels = torch.randint(128, (2, 24))
    labels[0, :5] = -100
    labels[1, -3:] = -100
    loss = model(x, labels=labels).ce_loss
    logits = model(x).logits
    keep = labels != -100
    expected = F.cross_entropy(logits[keep].float(), labels[keep])
    assert loss.dim() == 0 and loss.dtype == torch.float32
    torch.testing.assert_close(loss, expected)
    loss.backward()  # the loss path is differentiable end to end
    assert model.embed_tokens.weight.grad is not None


def test_bf16_autocast_forward():
    model = build(make_cfg())
    x = torch.randint(128, (2, 16))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(x, labels=x).ce_loss
    assert loss.dtype == torch.float32 and torch.isfinite(loss)


def test_flash_attn_missing_gives_clear_error():
    if importlib.util.find_spec("flash_attn") is not None:
        pytest.skip("flash_attn is installed")
    with pytest.raises(FlashAttnUnavailableError, match=r"pip install -e \.\[flash\]") as info:
        Transformer(make_cfg(), ExecutionConfig(attn_backend="flash_attn"))
    assert isinstance(info.value, ImportError)
    assert "execution.attn_backend=sdpa" in str(info.value)


def test_vocab_size_must_be_set():
    with pytest.raises(ValueError, match="vocab_size"):
        Transformer(make_cfg(vocab_size=0))


def test_sequence_longer_than_max_seq_len_fails():
    model = build(make_cfg(max_seq_len=16))
    with pytest.raises(ValueError, match="max_seq_len"):
        model(torch.zeros(1, 17, dtype=torch.long))


def test_init_is_deterministic_and_scaled():
    cfg = make_cfg(d_model=256, n_heads=4, ffn_hidden=512, n_layers=4, vocab_size=1024, init_std=0.02)
    a, b = build(cfg, seed=3), build(cfg, seed=3)
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(p, q), name
    layer = a.layers[1]
    assert layer.self_attn.q_proj.weight.std().item() == pytest.approx(0.02, rel=0.05)
    out_std = 0.02 / math.sqrt(2 * cfg.n_layers)
    assert layer.self_attn.o_proj.weight.std().item() == pytest.approx(out_std, rel=0.05)
    assert layer.mlp.down_proj.weight.std().item() == pytest.approx(out_std, rel=0.05)
    assert torch.equal(layer.input_layernorm.weight, torch.ones(cfg.d_model))
    assert a.lm_head.weight is a.embed_tokens.weight


def test_untied_head_is_separate():
    model = build(make_cfg(tie_embeddings=False))
    assert model.lm_head.weight is not model.embed_tokens.weight
    assert num_params(model) - num_params(build(make_cfg())) == 128 * 64


def test_rope_tables_stay_fp32():
    model = build(make_cfg()).to(torch.bfloat16)
    assert model.rotary_emb.cos.dtype == torch.float32
    torch.testing.assert_close(model.rotary_emb.cos, build(make_cfg()).rotary_emb.cos, atol=0, rtol=0)


def test_flops_per_token_is_about_6n_for_short_sequences():
    cfg = make_cfg(vocab_size=1024)
    model = build(cfg)
    norms = sum(p.numel() for n, p in model.named_parameters() if "norm" in n)
    # Matmul weights: everything but the norms and the embedding lookup, plus the (here tied) lm_head.
    n_matmul = num_params(model, exclude_embeddings=True) - norms + cfg.vocab_size * cfg.d_model
    assert flops_per_token(cfg, 1) == pytest.approx(6 * n_matmul, rel=0.01)
    attn_term = 12 * cfg.n_layers * cfg.n_heads * cfg.head_dim * 64
    assert flops_per_token(cfg, 64) - flops_per_token(cfg, 0) == pytest.approx(attn_term)


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.stem)
def test_shipped_model_configs_build(path):
    cfg = ModelConfig(**OmegaConf.to_container(OmegaConf.load(path)))
    assert cfg.name == path.stem and cfg.vocab_size == 0  # vocab comes from the tokenizer
    with torch.device("meta"):
        model = Transformer(dataclasses.replace(cfg, vocab_size=32000))
    assert num_params(model) > 0 and flops_per_token(model.cfg, cfg.max_seq_len) > 0


def test_llama_1b_matches_llama_3_2_1b_parameter_count():
    cfg = ModelConfig(**OmegaConf.to_container(OmegaConf.load(CONFIGS / "llama_1b.yaml")))
    with torch.device("meta"):
        model = Transformer(dataclasses.replace(cfg, vocab_size=128256))
    assert num_params(model) == 1_235_814_400  # meta-llama/Llama-3.2-1B


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("backend", ["sdpa", "flash_attn"])
def test_bf16_kernels_match_eager_on_gpu(backend):
    if backend == "flash_attn" and importlib.util.find_spec("flash_attn") is None:
        pytest.skip("flash_attn not installed")
    ref = build(make_cfg(n_heads=8, n_kv_heads=2, d_model=512), attn_backend="eager").cuda()
    model = build(make_cfg(n_heads=8, n_kv_heads=2, d_model=512), attn_backend=backend).cuda()
    model.load_state_dict(ref.state_dict())
    x = torch.randint(128, (2, 64), device="cuda")
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        torch.testing.assert_close(model(x).logits.float(), ref(x).logits.float(), atol=3e-2, rtol=0)
