"""model.doc_masking through train.pretrain (the eos id comes from the tokenizer) and train.bench (bench.doc_len)."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest

from data_pipeline.loader import DistributedBatchLoader, PackedSequences
from tests.helpers import losses, run_module, torchrun_pretrain, train_args
from tokenizer.tokenizer import Tokenizer


def boundary_steps(data, eos: int, seed: int, steps: int = 4) -> set[int]:
    """The steps (1-based) of a 2-rank run with 256-token rows, 2 per micro-batch, whose rows hold an eos."""
    rows = PackedSequences(data, "train", 256)
    loaders = [DistributedBatchLoader(rows, 2, 1, rank, 2, seed) for rank in range(2)]
    return {s for s in range(1, steps + 1) if any((x == eos).any() for ld in loaders for x, _ in ld.next_step())}


@pytest.mark.slow
def test_doc_masked_run_takes_eos_from_tokenizer(tiny_tokenizer, tiny_data, tmp_path):
    # Long documents (kowiki's dominate the tokens) leave many 256-token rows without a boundary: take the first data
    # seed whose first step has none and a later step has one, so the test sees both sides of the first boundary.
    eos = Tokenizer.from_dir(tiny_tokenizer).eos_id
    seed = next(s for s in range(100) if 1 not in (b := boundary_steps(tiny_data, eos, s)) and b)
    first = min(boundary_steps(tiny_data, eos, seed))
    shape = ("train.seq_len=256", "train.global_batch_tokens=1024", "train.max_steps=4", "deepspeed.zero_stage=2",
             f"train.seed={seed}")  # fmt: skip
    runs = {}
    for name, extra in [("plain", ()), ("masked", ("model.doc_masking=true", "model.doc_position_reset=true"))]:
        runs[name] = tmp_path / name
        torchrun_pretrain(*train_args(tiny_tokenizer, tiny_data, runs[name], *shape, *extra))
    tag = (runs["masked"] / "checkpoints" / "latest").read_text().strip()
    meta = json.loads((runs["masked"] / "checkpoints" / tag / "meta.json").read_text())
    assert meta["model"]["doc_masking"] and meta["model"]["eos_id"] == eos >= 0
    assert f"eos_id: {eos}" in (runs["masked"] / "config.yaml").read_text()
    masked, plain = losses(runs["masked"]), losses(runs["plain"])  # same seed, data and weights; only the mask differs
    assert sorted(masked) == [1, 2, 3, 4] and all(math.isfinite(v) for v in masked.values())
    assert masked[4] < masked[1]
    # Steps before the first boundary match the plain run (to rounding: the masked path gives sdpa an explicit
    # mask instead of is_causal); the first boundary makes the runs part.
    assert all(math.isclose(masked[s], plain[s], rel_tol=1e-6) for s in range(1, first)), (first, masked, plain)
    assert not math.isclose(masked[first], plain[first], rel_tol=1e-6), (first, masked, plain)


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
