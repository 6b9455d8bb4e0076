"""init.from_hf with a vocabulary extension (tokenizer.extend): base ids and rows kept, new rows the mean of the
base rows of each new piece's base tokenization, vocabulary a multiple of 128; errors for vocabularies that do
not match the weights; ZeRO-3 and tensor-parallel loading on two real ranks equal to a single-process load."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from launch.make_tiny_base import make_tiny_base
from model.config import ModelConfig
from model.hf import load_hf_state_dict
from tests.helpers import REPO, losses, run_module, torchrun_pretrain, train_args
from tokenizer.extend import extend
from tokenizer.hf_tokenizer import HFTextTokenizer, load_any
from train.checkpoint.init_from_hf import plan_hf_init
from train.config import DepthUpscaleConfig, InitConfig


@pytest.fixture(scope="module")
def en_tokenizer(tmp_path_factory) -> Path:
    """A 512-entry tokenizer trained on the English sample only: the base lacks nearly every Korean piece."""
    from data_pipeline.config import DataConfig
    from data_pipeline.sources import iter_texts
    from tokenizer.config import TokenizerConfig
    from tokenizer.train import train_tokenizer

    raw = OmegaConf.load(REPO / "configs" / "data" / "en_sample.yaml")
    for src in raw.sources.values():
        src.paths = [str(REPO / p) for p in src.paths]
    data = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(DataConfig), raw))
    out = tmp_path_factory.mktemp("en_tok")
    train_tokenizer(iter_texts(data), TokenizerConfig(name="en512", vocab_size=512, max_chars=200_000), out)
    return out


@pytest.fixture(scope="module")
def base_and_ext(en_tokenizer, tiny_tokenizer, tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("hf")
    make_tiny_base(root / "base", "Qwen2ForCausalLM", tokenizer=str(en_tokenizer))  # untied head
    extend(root / "base", tiny_tokenizer, root / "ext", max_added=300)
    return root / "base", root / "ext"


def test_extension_keeps_base_ids_and_pads_to_128(base_and_ext):
    from transformers import PreTrainedTokenizerFast as Fast

    base_dir, ext_dir = base_and_ext
    base, ext = Fast.from_pretrained(base_dir), Fast.from_pretrained(ext_dir)
    base_vocab, ext_vocab = base.get_vocab(), ext.get_vocab()
    assert all(ext_vocab[piece] == i for piece, i in base_vocab.items())
    record = json.loads((ext_dir / "hangang_extension.json").read_text())
    assert len(record["added"]) == 300 and record["vocab_size"] % 128 == 0
    assert record["vocab_size"] >= len(ext) == record["base_vocab_size"] + 300
    for a in record["added"]:
        assert a["base_ids"] == base.encode(a["piece"].replace("\u2581", " "), add_special_tokens=False)
    text = "대한민국의 수도는 서울이다. 영화가 정말 재미있었다."
    assert ext.decode(ext(text)["input_ids"]) == text
    assert len(ext(text)["input_ids"]) < len(base(text)["input_ids"])
    assert HFTextTokenizer(ext_dir).encode(text) == ext(text, add_special_tokens=False)["input_ids"]


def test_new_rows_are_the_mean_of_their_base_tokenization(base_and_ext):
    base_dir, ext_dir = base_and_ext
    info = plan_hf_init(InitConfig(from_hf=str(base_dir)), ModelConfig(), load_any(ext_dir), str(ext_dir))
    record = json.loads((ext_dir / "hangang_extension.json").read_text())
    assert info.model.vocab_size == record["vocab_size"] and info.meta["vocab_extension"]["added"] == 300
    sd = load_hf_state_dict(info.sources())
    from safetensors.torch import load_file

    orig = load_file(base_dir / "model.safetensors")
    n = record["base_vocab_size"]
    for ours, theirs in (("embed_tokens.weight", "model.embed_tokens.weight"), ("lm_head.weight", "lm_head.weight")):
        assert torch.equal(sd[ours][:n], orig[theirs])  # every base token's row unchanged
        for a in record["added"]:
            torch.testing.assert_close(sd[ours][a["id"]], orig[theirs][a["base_ids"]].mean(0))
        # rows past the new pieces (padding to a multiple of 128): the mean of all base rows
        torch.testing.assert_close(sd[ours][-1], orig[theirs].mean(0))


def test_vocabulary_that_does_not_match_the_weights(base_and_ext, tiny_tokenizer, tmp_path):
    base_dir, ext_dir = base_and_ext
    # A tokenizer with more tokens than the base's embedding rows, not an extension of it.
    with pytest.raises(ValueError, match="2048 tokens but .* 512 embedding rows: the vocabulary does not match"):
        plan_hf_init(InitConfig(from_hf=str(base_dir)), ModelConfig(), load_any(tiny_tokenizer), str(tiny_tokenizer))
    # An extension of another base (other vocabulary size).
    other = tmp_path / "other"
    shutil.copytree(ext_dir, other)
    record = json.loads((other / "hangang_extension.json").read_text())
    record["base_vocab_size"] = 1024
    (other / "hangang_extension.json").write_text(json.dumps(record))
    with pytest.raises(ValueError, match="extends a base with 1024 embedding rows.*has 512"):
        plan_hf_init(InitConfig(from_hf=str(base_dir)), ModelConfig(), load_any(other), str(other))


def test_depth_upscale_ranges_are_checked(base_and_ext):
    base_dir, _ = base_and_ext
    init = InitConfig(from_hf=str(base_dir), depth_upscale=DepthUpscaleConfig(layers=[[0, 3], [1, 5]]))
    with pytest.raises(ValueError, match=r"range \[1, 5\) exceeds the base model's 4 layers"):
        plan_hf_init(init, ModelConfig(), load_any(base_dir), str(base_dir))
    init = InitConfig(from_hf=str(base_dir), depth_upscale=DepthUpscaleConfig(layers=[[0, 3], [1, 4]]))
    info = plan_hf_init(init, ModelConfig(), load_any(base_dir), str(base_dir))
    assert info.model.n_layers == 6 and info.layer_map == [0, 1, 2, 1, 2, 3]


def run_loading_worker(worker: str, families: tuple[str, ...], tmp_path) -> None:
    """Make a tiny base per family and run the 2-rank loading check `tests.train.checkpoint.WORKER` on them."""
    for family in families:
        make_tiny_base(tmp_path / family, family)
    module = f"tests.train.checkpoint.{worker}"
    proc = run_module(
        "torchrun", "--standalone", "--nproc_per_node=2", "-m", module, *(str(tmp_path / f) for f in families)
    )
    assert "OK" in proc.stdout, proc.stdout[-2000:]


@pytest.mark.slow
def test_zero3_loading_equals_single_process_load(tmp_path):
    run_loading_worker("hf_zero3_worker", ("LlamaForCausalLM", "Qwen3ForCausalLM", "DeepseekV3ForCausalLM"), tmp_path)


@pytest.mark.slow
def test_tensor_parallel_loading_equals_single_rank_load(tmp_path):
    """tp 2 under ZeRO-1 and ZeRO-3: each rank reads only its shards (tied vocabulary-parallel embedding, Qwen2
    biases, Qwen3 QK-norm, MLA and MoE); the same parameters, logits and loss as a single-process load
    (hf_tp_worker)."""
    families = ("LlamaForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM", "DeepseekV3ForCausalLM")
    run_loading_worker("hf_tp_worker", families, tmp_path)


@pytest.mark.slow
def test_pretrain_from_hf_with_tensor_parallel_trains_like_one_rank(en_tokenizer, tmp_path):
    """A Qwen3 base (per-head QK-norm, replicated but fed by each rank's heads only) trained 5 steps with tp 2
    gives the losses of one rank: the norms' gradients are summed over the tensor-parallel group."""
    from data_pipeline.prepare import prepare
    from tests.helpers import sample_data_config

    base = tmp_path / "base"
    make_tiny_base(base, "Qwen3ForCausalLM", tokenizer=str(en_tokenizer))
    data = tmp_path / "data"
    prepare(sample_data_config(max_docs_per_source=100, val_fraction=0.1), load_any(base), str(base), data,
            log=lambda m: None)  # fmt: skip
    runs = {}
    for nproc, extra in ((1, ()), (2, ("parallel.tp_size=2",))):
        runs[nproc] = tmp_path / f"run{nproc}"
        argv = train_args(base, data, runs[nproc], "deepspeed.zero_stage=1", f"init.from_hf={base}", "optim.lr=1e-2",
                          "train.max_steps=5", "train.eval_every=0", "checkpoint.every_steps=0", *extra)  # fmt: skip
        run_module("torchrun", "--standalone", f"--nproc_per_node={nproc}", "-m", "train.pretrain", *argv)
    got, want = losses(runs[2]), losses(runs[1])
    assert sorted(got) == [1, 2, 3, 4, 5]
    for step, value in want.items():
        assert abs(got[step] - value) <= 1e-5 * abs(value), (step, got[step], value)


@pytest.mark.slow
def test_pretrain_from_extended_upscaled_base_under_zero3_and_export(base_and_ext, tmp_path):
    """2 ranks, ZeRO-3: a Qwen2 base, its Korean extension and depth up-scaling 4 -> 6 layers; the loss falls,
    meta.json names the base, train.export writes a Qwen2ForCausalLM that transformers loads."""
    from data_pipeline.prepare import prepare
    from tests.helpers import sample_data_config

    base_dir, ext_dir = base_and_ext
    data = tmp_path / "data"
    prepare(sample_data_config(max_docs_per_source=200, val_fraction=0.1), HFTextTokenizer(ext_dir), str(ext_dir),
            data, log=lambda m: None)  # fmt: skip
    run = tmp_path / "run"
    torchrun_pretrain(*train_args(ext_dir, data, run, "deepspeed.zero_stage=3", f"init.from_hf={base_dir}",
                                  "init.depth_upscale.layers=[[0,3],[1,4]]", "optim.lr=3e-3"))  # fmt: skip
    got = losses(run)
    assert got[10] < got[1]
    meta = json.loads((run / "checkpoints" / "step_00000010" / "meta.json").read_text())
    assert meta["base_model"]["architecture"] == "Qwen2ForCausalLM"
    assert meta["base_model"]["depth_upscale"] == [[0, 3], [1, 4]] and meta["model"]["n_layers"] == 6
    assert len(meta["base_model"]["config_sha256"]) == 64 and "model.safetensors" in meta["base_model"]["files"]
    run_module("train.export", f"run.dir={run}", f"out={tmp_path / 'hf'}")
    import transformers

    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    assert type(hf).__name__ == "Qwen2ForCausalLM" and hf.config.num_hidden_layers == 6
