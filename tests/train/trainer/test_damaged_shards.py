"""Damaged token shards never train (issue 13): before the first step every shard is checked against
data.path/manifest.json (sizes always, sha256 unless data.verify_hashes=false), and a resume whose data position no
longer fits the data names the shard that changed. Each fault is injected into a real `python -m train.pretrain`."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from data_pipeline.prepare import prepare
from data_pipeline.shards import MANIFEST
from tests.helpers import run_module, sample_data_config, train_args
from tokenizer.tokenizer import Tokenizer


def pretrain(*args: str):
    """One process, no torchrun: the shard check runs in the plan, before any collective."""
    return run_module("train.pretrain", *args, check=False, timeout=300)


@pytest.fixture
def data(tiny_data, tmp_path) -> Path:
    """A private copy of the session's shards, free to damage."""
    return Path(shutil.copytree(tiny_data, tmp_path / "data"))


def one_error_line(proc) -> str:
    """The run refused with exit code 2 and exactly one `error: ...` line, no traceback; returns that line."""
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert not (proc.stdout.strip()), proc.stdout[-2000:]  # no summary: nothing trained
    return errors[0]


def shard(data: Path) -> tuple[Path, dict]:
    manifest = json.loads((data / MANIFEST).read_text())
    entry = manifest["splits"]["train"]["shards"][0]
    return data / entry["file"], entry


@pytest.mark.parametrize("cut", [1000, 1001], ids=["even", "odd"])
@pytest.mark.parametrize("verify", ["true", "false"])
def test_truncated_shard_is_refused(tiny_tokenizer, data, tmp_path, cut, verify):
    path, entry = shard(data)
    size = path.stat().st_size - cut
    with open(path, "r+b") as f:
        f.truncate(size)
    proc = pretrain(*train_args(tiny_tokenizer, data, tmp_path / "run"), f"data.verify_hashes={verify}")
    line = one_error_line(proc)
    assert str(path) in line and f"{size:,} bytes" in line and f"expects {entry['tokens'] * 2:,}" in line, line
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_altered_shard_is_refused(tiny_tokenizer, data, tmp_path):
    path, entry = shard(data)
    raw = bytearray(path.read_bytes())
    raw[100:104] = bytes(b ^ 0xFF for b in raw[100:104])  # same size, other tokens
    path.write_bytes(bytes(raw))
    proc = pretrain(*train_args(tiny_tokenizer, data, tmp_path / "run"))
    line = one_error_line(proc)
    assert str(path) in line and f"expects {entry['sha256']}" in line and "sha256 " in line, line


def test_missing_validation_shard_is_refused(tiny_tokenizer, data, tmp_path):
    manifest = json.loads((data / MANIFEST).read_text())
    val = data / manifest["splits"]["val"]["shards"][0]["file"]
    val.unlink()
    line = one_error_line(pretrain(*train_args(tiny_tokenizer, data, tmp_path / "run")))
    assert str(val) in line and "is missing" in line, line


def test_resume_on_changed_data_names_the_shard(tiny_tokenizer, data, tmp_path):
    run = tmp_path / "run"
    args = train_args(tiny_tokenizer, data, run, "train.max_steps=2", "checkpoint.every_steps=2", "train.eval_every=0")
    run_module("train.pretrain", *args, timeout=300)
    assert (run / "checkpoints" / "latest").is_file()
    # The data re-prepared in place from fewer documents: a valid directory, but not the one the run trained on.
    shutil.rmtree(data)
    tok = Tokenizer.from_dir(tiny_tokenizer)
    prepare(sample_data_config(max_docs_per_source=200, val_fraction=0.1), tok, str(tiny_tokenizer), data,
            log=lambda m: None)  # fmt: skip
    line = one_error_line(pretrain(*train_args(tiny_tokenizer, data, run, "train.max_steps=4")))
    assert "changed since that checkpoint: train_00000.bin: " in line and " tokens" in line, line
    assert "training sequences" in line, line
