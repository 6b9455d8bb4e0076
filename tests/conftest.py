"""Shared pytest setup: markers, and a small tokenizer + token shards built once per session."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers import sample_data_config, torchrun_pretrain, train_args


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs an accelerator (also skipif-ed when none is available)")
    config.addinivalue_line("markers", "slow: multi-process (torchrun) or long training jobs; make test-fast skips")


@pytest.fixture(scope="session")
def tiny_tokenizer(tmp_path_factory) -> Path:
    """A 2048-entry tokenizer trained on the repo's sample (a few seconds)."""
    from data_pipeline.sources import iter_texts
    from tokenizer.config import TokenizerConfig
    from tokenizer.train import train_tokenizer

    out = tmp_path_factory.mktemp("tokenizer")
    cfg = TokenizerConfig(name="test2k", vocab_size=2048, character_coverage=0.995, max_chars=400_000)
    train_tokenizer(iter_texts(sample_data_config(), max_docs_per_source=400), cfg, out)
    return out


@pytest.fixture(scope="session")
def tiny_data(tiny_tokenizer, tmp_path_factory) -> Path:
    """Token shards of a slice of the sample, prepared with `tiny_tokenizer`."""
    from data_pipeline.prepare import prepare
    from tokenizer.tokenizer import Tokenizer

    out = tmp_path_factory.mktemp("data")
    data = sample_data_config(max_docs_per_source=300, val_fraction=0.1)
    prepare(data, Tokenizer.from_dir(tiny_tokenizer), str(tiny_tokenizer), out, log=lambda m: None)
    return out


@pytest.fixture(scope="session")
def trained_run(tiny_tokenizer, tiny_data, tmp_path_factory) -> Path:
    """A finished 10-step, 2-process ZeRO-2 run with offline W&B (checkpoints at steps 5 and 10)."""
    run_dir = tmp_path_factory.mktemp("runs") / "zero2"
    torchrun_pretrain(
        *train_args(tiny_tokenizer, tiny_data, run_dir, "deepspeed.zero_stage=2", "logging.wandb.mode=offline")
    )
    return run_dir
