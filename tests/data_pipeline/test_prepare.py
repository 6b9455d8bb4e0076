"""prepare: license policy, missing paths, accounting, determinism, and the manifest (bill of materials)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from data_pipeline.prepare import prepare
from data_pipeline.shards import TokenStream, read_manifest
from data_pipeline.sources import LicenseError
from data_pipeline.text_tokenizer import TextTokenizer
from tests.helpers import run_module, sample_data_config
from tokenizer.tokenizer import Tokenizer


def test_manifest_accounts_for_every_document(tiny_data, tiny_tokenizer):
    m = read_manifest(tiny_data)
    assert m["tokenizer"]["sha256"] == Tokenizer.from_dir(tiny_tokenizer).sha256
    assert set(m["sources"]) == {"kowiki", "nsmc", "legal_precedents", "constitution", "chatbot"}
    for name, src in m["sources"].items():
        assert src["docs_in"] == src["docs_kept"] + sum(src["rejected"].values()), name
        assert src["license"] and src["files"] and all(len(f["sha256"]) == 64 for f in src["files"])
        assert src["tokens"] == src["train_tokens"] + src["val_tokens"]
    total = sum(s["tokens"] for s in m["sources"].values())
    assert total == m["splits"]["train"]["tokens"] + m["splits"]["val"]["tokens"]
    assert m["dtype"] == "uint16"


def test_shards_hold_eos_separated_documents(tiny_data, tiny_tokenizer):
    m = read_manifest(tiny_data)
    tok = Tokenizer.from_dir(tiny_tokenizer)
    stream = TokenStream(tiny_data, m["splits"]["train"]["shards"], m["dtype"])
    head = stream.read(0, 4000)
    n_eos = int((head == tok.eos_id).sum())
    assert n_eos > 0
    first_doc = head[: int(np.argmax(head == tok.eos_id))]
    assert len(tok.decode(first_doc.tolist())) > 0


def test_prepare_is_deterministic(tiny_tokenizer, tmp_path):
    tok = Tokenizer.from_dir(tiny_tokenizer)
    data = sample_data_config(max_docs_per_source=50)
    a = prepare(data, tok, str(tiny_tokenizer), tmp_path / "a", log=lambda m: None)
    b = prepare(data, tok, str(tiny_tokenizer), tmp_path / "b", log=lambda m: None)
    assert a["splits"] == b["splits"]


def test_disallowed_license_is_refused_before_any_work(tiny_tokenizer, tmp_path):
    data = sample_data_config(allowed_licenses=["CC0-1.0"])
    with pytest.raises(LicenseError, match="kowiki.*CC-BY-SA-3.0"):
        prepare(data, Tokenizer.from_dir(tiny_tokenizer), str(tiny_tokenizer), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_source_without_license_is_refused(tiny_tokenizer, tmp_path):
    data = sample_data_config(sources={"nsmc": {"license": None}})
    with pytest.raises(LicenseError, match="'nsmc' declares no license"):
        prepare(data, Tokenizer.from_dir(tiny_tokenizer), str(tiny_tokenizer), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_cli_missing_path_is_one_clear_error(tiny_tokenizer, tmp_path):
    proc = run_module(
        "data_pipeline.prepare",
        f"tokenizer.path={tiny_tokenizer}",
        f"out={tmp_path / 'out'}",
        "data.sources.nsmc.paths=[/nonexistent/*.parquet]",
        check=False,
    )
    assert proc.returncode == 2
    assert "data source 'nsmc': path '/nonexistent/*.parquet' matches no file" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "out").exists()


def test_cli_writes_manifest(tiny_tokenizer, tmp_path):
    proc = run_module(
        "data_pipeline.prepare",
        f"tokenizer.path={tiny_tokenizer}",
        f"out={tmp_path / 'out'}",
        "data.max_docs_per_source=20",
    )
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["tokens"]["train"] > 0
    assert (tmp_path / "out" / "manifest.json").is_file()


def test_project_tokenizer_satisfies_the_protocol(tiny_tokenizer):
    assert isinstance(Tokenizer.from_dir(tiny_tokenizer), TextTokenizer)


def test_cli_loader_not_returning_a_tokenizer_is_one_clear_error(tiny_tokenizer, tmp_path):
    proc = run_module(
        "data_pipeline.prepare",
        f"tokenizer.path={tiny_tokenizer}",
        "tokenizer.loader=pathlib:Path",
        f"out={tmp_path / 'out'}",
        check=False,
    )
    assert proc.returncode == 2
    assert "which lacks one of vocab_size, eos_id, sha256, encode_batch" in proc.stderr
    assert "Traceback" not in proc.stderr
