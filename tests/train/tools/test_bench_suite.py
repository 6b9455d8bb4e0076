"""Benchmark suites: variants in subprocesses, failures recorded as rows, the table between markers, the
micro-batch search, and the model transforms (compile, fp8) the benchmark shares with training."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from model.config import ModelConfig
from model.transformer import Block, Transformer
from train.engine.optimize import check_fp8, compile_blocks
from train.tools.bench_suite import markers, search_max, write_table

ROOT = Path(__file__).resolve().parents[3]


@pytest.mark.parametrize("limit", [0, 1, 3, 5, 8, 13, 64, 1000])
@pytest.mark.parametrize("start", [1, 4, 16])
def test_search_max_finds_the_largest_fit(start, limit):
    tried = []

    def fits(n):
        tried.append(n)
        return n <= limit

    best, capped = search_max(start, 256, fits)
    assert best == min(limit, 256) and capped == (limit >= 256)
    assert len(tried) <= 2 * 9  # doubling + bisection, not a linear scan


def test_write_table_replaces_only_between_markers(tmp_path):
    (a0, a1), (b0, b1) = markers("configs/bench_suite/a.yaml"), markers("b.yaml")
    path = tmp_path / "B.md"
    path.write_text(f"# Benchmarks\n\nintro\n{a0}\nold a\n{a1}\n\n## Other\n{b0}\nold b\n{b1}\ntext\n")
    write_table(str(path), "new a\n", "a.yaml")
    assert path.read_text() == f"# Benchmarks\n\nintro\n{a0}\nnew a\n{a1}\n\n## Other\n{b0}\nold b\n{b1}\ntext\n"
    fresh = tmp_path / "new.md"
    write_table(str(fresh), "t\n", "b.yaml")
    write_table(str(fresh), "u\n", "b.yaml")
    assert fresh.read_text() == f"{b0}\nu\n{b1}\n"


def test_suite_runs_each_variant_and_records_failures(tmp_path):
    suite = tmp_path / "suite.yaml"
    suite.write_text(
        "common: [model=tiny, model.n_layers=1, model.vocab_size=256, bench.seq_len=32, bench.steps=1,"
        " bench.warmup=1, bench.micro_batch_size=2]\n"
        "variants:\n"
        "  - {name: peer, overrides: [bench.impl=transformers]}\n"
        "  - {name: broken, overrides: [execution.loss_impl=nope]}\n"
        "  - {name: ours, overrides: [execution.loss_impl=chunked, execution.activation_checkpointing=selective]}\n"
    )
    table = tmp_path / "BENCH.md"
    start, end = markers(str(suite))
    table.write_text(f"keep\n{start}\n{end}\nkeep too\n")
    cmd = [sys.executable, "-m", "train.bench", f"bench.suite={suite}", f"bench.table_out={table}"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert [(r["variant"], r["status"]) for r in rows] == [("peer", "ok"), ("broken", "error"), ("ours", "ok")]
    assert "execution.loss_impl='nope'" in rows[1]["error"]
    assert (rows[0]["impl"], rows[2]["impl"]) == ("transformers", "hangang")
    assert (rows[2]["loss_impl"], rows[2]["activation_checkpointing"]) == ("chunked", "selective")
    assert rows[0]["first_loss"] == pytest.approx(rows[2]["first_loss"], abs=1e-3)  # same weights and batch
    text = table.read_text()
    assert text.startswith(f"keep\n{start}\nDevice: cpu") and text.endswith(f"{end}\nkeep too\n")
    ours_row = next(line for line in text.splitlines() if line.startswith("| ours |"))
    assert "| chunked |" in ours_row and "| selective |" in ours_row and ours_row.count("x |") == 1  # speedup


def test_compile_blocks_keeps_names_and_results():
    cfg = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden=64, max_seq_len=16)
    torch.manual_seed(0)
    model = Transformer(cfg)
    names = list(model.state_dict())
    compile_blocks(model)
    blocks = [m for m in model.modules() if isinstance(m, Block)]
    assert len(blocks) == 2 and all(b._compiled_call_impl is not None for b in blocks)
    assert list(model.state_dict()) == names  # checkpoints and HF export see the same keys


@pytest.mark.skipif(torch.cuda.is_available(), reason="CPU-only error path")
def test_fp8_without_gpu_or_torchao_is_a_clear_error():
    with pytest.raises(ValueError, match="execution.fp8=true"):
        check_fp8()


def test_overlap_settings_reach_the_deepspeed_config():
    from train.config import DeepSpeedConfig, OptimConfig
    from train.engine.deepspeed_engine import deepspeed_config
    from train.trainer.layout import make_layout

    ds = DeepSpeedConfig(overlap_comm=True, contiguous_gradients=False, reduce_bucket_size=123, allgather_bucket_size=7)
    out = deepspeed_config(ds, OptimConfig(), make_layout(8192, 256, 8, 2), torch.bfloat16)["zero_optimization"]
    assert (out["overlap_comm"], out["contiguous_gradients"]) == (True, False)
    assert (out["reduce_bucket_size"], out["allgather_bucket_size"]) == (123, 7)


@pytest.mark.parametrize("suite", sorted((ROOT / "configs" / "bench_suite").glob("*.yaml")), ids=lambda p: p.stem)
def test_shipped_suites_compose(suite):
    """Every variant of every shipped suite is a valid `python -m train.bench` command line."""
    from hydra import compose, initialize_config_dir

    import train.tools.bench  # noqa: F401  (registers bench_schema)
    from data_pipeline.cli import to_object_strict
    from train.tools.bench_suite import load_suite

    common, variants = load_suite(str(suite))
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        for v in variants:
            root = to_object_strict(compose("bench", overrides=[*common, *v["overrides"]]))
            assert root.bench.seq_len <= root.model.max_seq_len, v["name"]
