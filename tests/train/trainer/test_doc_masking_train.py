"""model.doc_masking through train.pretrain (the eos id comes from the tokenizer) and train.bench (bench.doc_len)."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest

from tests.helpers import losses, run_module, torchrun_pretrain, train_args
from tokenizer.tokenizer import Tokenizer


@pytest.mark.slow
def test_doc_masked_run_takes_eos_from_tokenizer(tiny_tokenizer, tiny_data, tmp_path):
    # 256-token rows: documents of the sample average ~775 tokens, so some of the first steps cross a boundary.
    shape = ("train.seq_len=256", "train.global_batch_tokens=1024", "train.max_steps=4", "deepspeed.zero_stage=2")
    runs = {}
    for name, extra in [("plain", ()), ("masked", ("model.doc_masking=true", "model.doc_position_reset=true"))]:
        runs[name] = tmp_path / name
        torchrun_pretrain(*train_args(tiny_tokenizer, tiny_data, runs[name], *shape, *extra))
    eos = Tokenizer.from_dir(tiny_tokenizer).eos_id
    tag = (runs["masked"] / "checkpoints" / "latest").read_text().strip()
    meta = json.loads((runs["masked"] / "checkpoints" / tag / "meta.json").read_text())
    assert meta["model"]["doc_masking"] and meta["model"]["eos_id"] == eos >= 0
    assert f"eos_id: {eos}" in (runs["masked"] / "config.yaml").read_text()
    masked, plain = losses(runs["masked"]), losses(runs["plain"])  # same seed, data and weights; only the mask differs
    assert sorted(masked) == [1, 2, 3, 4] and all(math.isfinite(v) for v in masked.values())
    assert masked[4] < masked[1]
    # Steps whose rows hold no boundary match the plain run; the first boundary makes the runs part.
    assert any(not math.isclose(masked[s], plain[s], rel_tol=1e-6) for s in masked), (masked, plain)


def test_doc_masking_errors(tiny_tokenizer, tiny_data, tmp_path):
    args = train_args(tiny_tokenizer, tiny_data, tmp_path / "run")
    eos = Tokenizer.from_dir(tiny_tokenizer).eos_id
    proc = run_module("train.pretrain", *args, "model.doc_masking=true", f"model.eos_id={eos + 1}", check=False)
    assert proc.returncode == 2 and "is not the tokenizer's eos id" in proc.stderr, proc.stderr[-2000:]
    proc = run_module("train.pretrain", *args, "model.attn_backend=flex", check=False)
    expected = "execution.attn_backend=flex trains on CUDA only"
    assert proc.returncode == 2 and expected in proc.stderr, proc.stderr[-2000:]


def test_bench_plants_documents():
    """bench.doc_len plants eos tokens, so doc masking changes the first loss of the same weights and batch."""
    from model.config import ModelConfig
    from train.tools.bench import BenchConfig, BenchRoot, run

    bench = BenchConfig(seq_len=64, micro_batch_size=2, steps=1, warmup=0, peer=False, doc_len=8, device="cpu")
    first = {}
    for masking in (False, True):
        model = ModelConfig(
            vocab_size=128, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden=96, max_seq_len=64
        )
        summary = run(BenchRoot(model=dataclasses.replace(model, doc_masking=masking), bench=bench))
        assert summary["doc_masking"] is masking and summary["doc_len"] == 8
        first[masking] = summary["first_loss"]
    assert first[True] != first[False]
