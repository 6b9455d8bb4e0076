"""`zero_load.materialize`: a model built on the meta device gets real storage with its parameters' identity,
attributes and ties kept (AutoTP's hooks and metadata live on them) and its RoPE tables rebuilt."""

from __future__ import annotations

import torch

from model.config import ModelConfig
from model.transformer import Transformer
from train.engine.zero_load import materialize


def test_materialize_keeps_parameters_and_rebuilds_derived_buffers():
    cfg = ModelConfig(vocab_size=64, d_model=32, n_layers=1, n_heads=2, n_kv_heads=1, ffn_hidden=64, max_seq_len=16,
                      tie_embeddings=True)  # fmt: skip
    with torch.device("meta"):
        model = Transformer(cfg, random_init=False)
    params = dict(model.named_parameters())
    params["layers.0.self_attn.q_proj.weight"].marker = "kept"
    materialize(model, torch.device("cpu"))
    assert all(p is params[n] and p.device.type == "cpu" for n, p in model.named_parameters())
    assert params["layers.0.self_attn.q_proj.weight"].marker == "kept"
    assert model.lm_head.weight is model.embed_tokens.weight
    reference = Transformer(cfg)
    assert not any(b.is_meta for b in model.buffers())
    torch.testing.assert_close(model.rotary_emb.cos, reference.rotary_emb.cos, rtol=0, atol=0)
