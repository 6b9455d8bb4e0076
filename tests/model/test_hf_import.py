"""Import from Hugging Face (`model/hf.py` read the other way): tiny models of each family built locally with
transformers, loaded into our Transformer and exported again; same logits as the original (fp32, 1e-4)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import transformers

from launch.make_tiny_base import FAMILIES, make_tiny_base
from model.hf import HFWeights, hf_sources, load_hf_state_dict, model_config_from_hf, save_hf_model
from model.transformer import Transformer
from tests.helpers import one_thread  # noqa: F401  (autouse fixture)


def load_ours(hf_dir, **kw) -> Transformer:
    cfg = model_config_from_hf(hf_dir)
    raw = json.loads((hf_dir / "config.json").read_text())
    sd = load_hf_state_dict(hf_sources(cfg, HFWeights(hf_dir), rope_interleave=raw.get("rope_interleave", False), **kw))
    model = Transformer(cfg, random_init=False)
    missing, unexpected = model.load_state_dict(sd, strict=False)
    assert not unexpected and set(missing) <= ({"lm_head.weight"} if cfg.tie_embeddings else set())
    return model.eval()


@pytest.mark.parametrize("family", FAMILIES)
def test_round_trip_logits_per_family(tmp_path, family):
    hf = make_tiny_base(tmp_path / "base", family).eval()
    ours = load_ours(tmp_path / "base")
    assert ours.cfg.hf_architecture == family
    x = torch.randint(ours.cfg.vocab_size, (2, 40))
    with torch.no_grad():
        reference = hf(x).logits
        assert (ours(x).logits - reference).abs().max().item() <= 1e-4
    save_hf_model(tmp_path / "out", ours.state_dict(), ours.cfg, bos_id=1, eos_id=2, pad_id=0)
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert type(back).__name__ == family
    with torch.no_grad():
        assert (back(x).logits - reference).abs().max().item() <= 1e-4


def test_family_options_are_derived(tmp_path):
    make_tiny_base(tmp_path / "q2", "Qwen2ForCausalLM")
    make_tiny_base(tmp_path / "q3", "Qwen3ForCausalLM")
    make_tiny_base(tmp_path / "mi", "MistralForCausalLM")
    q2, q3, mi = (model_config_from_hf(tmp_path / n) for n in ("q2", "q3", "mi"))
    assert q2.qkv_bias and not q2.qk_norm and not q2.tie_embeddings
    assert q3.qk_norm and q3.head_dim == 32 and q3.head_dim_override == 32
    assert mi.sliding_window == 256 and mi.max_seq_len == 256


def test_unsupported_architecture_is_named(tmp_path):
    make_tiny_base(tmp_path, "LlamaForCausalLM")
    raw = json.loads((tmp_path / "config.json").read_text())
    raw["architectures"] = ["GPT2LMHeadModel"]
    (tmp_path / "config.json").write_text(json.dumps(raw))
    with pytest.raises(ValueError, match="architecture 'GPT2LMHeadModel'.*not supported.*Qwen2ForCausalLM"):
        model_config_from_hf(tmp_path)


def test_rope_scaling_is_refused(tmp_path):
    make_tiny_base(tmp_path, "LlamaForCausalLM")
    raw = json.loads((tmp_path / "config.json").read_text())
    raw["rope_parameters"] = {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}
    (tmp_path / "config.json").write_text(json.dumps(raw))
    with pytest.raises(ValueError, match="RoPE scaling rope_type='linear'"):
        model_config_from_hf(tmp_path)


def test_missing_files_are_named(tmp_path):
    make_tiny_base(tmp_path / "a", "LlamaForCausalLM")
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    (tmp_path / "a" / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="neither model.safetensors nor model.safetensors.index.json"):
        HFWeights(tmp_path / "a")
    (tmp_path / "b" / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="config.json not found"):
        model_config_from_hf(tmp_path / "b")


def test_depth_upscaling_maps_layers_and_exports(tmp_path):
    make_tiny_base(tmp_path / "base", "Qwen2ForCausalLM", layers=4)
    layer_map = [0, 1, 2, 1, 2, 3]  # init.depth_upscale.layers=[[0, 3], [1, 4]]
    import dataclasses

    cfg = dataclasses.replace(model_config_from_hf(tmp_path / "base"), n_layers=6)
    sources = hf_sources(cfg, HFWeights(tmp_path / "base"), layer_map=layer_map)
    sd = load_hf_state_dict(sources)
    base = load_ours(tmp_path / "base").state_dict()
    for i, j in enumerate(layer_map):
        for suffix in ("self_attn.q_proj.bias", "mlp.down_proj.weight", "input_layernorm.weight"):
            assert torch.equal(sd[f"layers.{i}.{suffix}"], base[f"layers.{j}.{suffix}"])
    model = Transformer(cfg, random_init=False)
    model.load_state_dict(sd, strict=True)
    save_hf_model(tmp_path / "out", model.state_dict(), cfg, bos_id=1, eos_id=2, pad_id=0)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    assert hf.config.num_hidden_layers == 6
    x = torch.randint(cfg.vocab_size, (1, 24))
    with torch.no_grad():
        assert (hf(x).logits - model.eval()(x).logits).abs().max().item() <= 1e-4


def test_unused_tensors_are_refused(tmp_path):
    """A checkpoint tensor the derived model has no place for (an option we do not know) is an error."""
    from safetensors.torch import load_file, save_file

    make_tiny_base(tmp_path, "LlamaForCausalLM")
    sd = load_file(tmp_path / "model.safetensors")
    sd["model.layers.0.self_attn.o_proj.bias"] = torch.zeros(64)
    save_file(sd, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match="no place for.*o_proj.bias"):
        hf_sources(model_config_from_hf(tmp_path), HFWeights(tmp_path))


def test_slices_read_only_their_part(tmp_path):
    """A tensor-parallel shard's rows or columns (`part_reader`), DeepSeek's RoPE permutation included, equal the
    same slice of the whole tensor; fused experts (never tensor-parallel) refuse a column slice."""
    from model.hf import part_reader

    make_tiny_base(tmp_path, "DeepseekV3ForCausalLM")
    cfg = model_config_from_hf(tmp_path)
    sources = hf_sources(cfg, HFWeights(tmp_path), rope_interleave=True)
    whole = load_hf_state_dict(sources)
    read = part_reader(sources)
    for name in ("layers.0.self_attn.q_b_proj.weight", "layers.1.self_attn.kv_a_proj_with_mqa.weight",
                 "layers.0.self_attn.o_proj.weight", "embed_tokens.weight"):  # fmt: skip
        for dim in (0, 1):
            n = whole[name].shape[dim]
            for a, b in ((0, n // 2), (n // 2, n)):
                got = read(name, dim, a, b)
                assert torch.equal(got, whole[name].narrow(dim, a, b - a)), (name, dim, a, b)
    with pytest.raises(NotImplementedError, match="slices along dim 1"):
        read("layers.1.mlp.experts.gate_up_proj", 1, 0, 8)
