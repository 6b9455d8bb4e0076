"""Shared pytest setup: markers, and a small tokenizer + token shards built once per session."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers import sample_data_config


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA device (also skipif-ed when none is available)")


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
