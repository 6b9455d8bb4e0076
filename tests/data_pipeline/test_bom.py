"""The bill of materials travels with training: in the run directory, in every checkpoint, in W&B, and
`python -m data_pipeline.bom` prints it."""

from __future__ import annotations

import json

import pytest

from data_pipeline.bom import bom_summary, find_bom, hydra_args
from data_pipeline.shards import read_manifest
from tests.helpers import run_module


@pytest.mark.slow  # a torchrun job (trained_run)
def test_every_checkpoint_carries_the_bom(trained_run, tiny_data):
    manifest = read_manifest(tiny_data)
    tags = sorted((trained_run / "checkpoints").glob("step_*"))
    assert tags
    for tag in tags:
        assert json.loads((tag / "bom.json").read_text()) == manifest
    assert json.loads((trained_run / "bom.json").read_text()) == manifest
    assert find_bom(trained_run) == tags[-1] / "bom.json"


@pytest.mark.slow  # a torchrun job (trained_run)
def test_wandb_config_holds_the_bom_summary(trained_run, tiny_data):
    summary = bom_summary(read_manifest(tiny_data))
    files = list((trained_run / "wandb").glob("offline-run-*/run-*.wandb"))  # the offline run's record log
    assert files, "offline W&B run"
    raw = files[0].read_bytes()
    assert b"data_bom" in raw and summary["tokenizer_sha256"].encode() in raw


@pytest.mark.slow  # a torchrun job (trained_run)
def test_bom_cli_prints_sources_licenses_and_tokens(trained_run, tiny_data):
    manifest = read_manifest(tiny_data)
    ckpt = sorted((trained_run / "checkpoints").glob("step_*"))[0]
    for where in (trained_run, ckpt, tiny_data):
        out = run_module("data_pipeline.bom", str(where)).stdout
        for name, src in manifest["sources"].items():
            assert name in out and src["license"] in out and f"{src['train_tokens']:,}" in out
    as_json = json.loads(run_module("data_pipeline.bom", "--json", str(ckpt)).stdout)
    assert as_json["train_tokens"] == manifest["splits"]["train"]["tokens"]
    proc = run_module("data_pipeline.bom", str(tiny_data / "nope"), check=False)
    assert proc.returncode == 2 and "no bill of materials" in proc.stderr


def test_bom_cli_hydra_spelling_legacy_spelling_and_help(tiny_data, tmp_path):
    manifest = read_manifest(tiny_data)
    for args in ([f"path={tiny_data}", "json=true"], ["--json", str(tiny_data)], [str(tiny_data), "--json"]):
        as_json = json.loads(run_module("data_pipeline.bom", *args).stdout)
        assert as_json["train_tokens"] == manifest["splits"]["train"]["tokens"], args
    odd = tmp_path / "a b,c[d]'s"
    odd.mkdir()
    (odd / "manifest.json").write_text((tiny_data / "manifest.json").read_text())
    assert "train tokens" in run_module("data_pipeline.bom", str(odd)).stdout
    help_text = run_module("data_pipeline.bom", "--help").stdout
    assert "python -m data_pipeline.bom PATH [--json]" in help_text and "no bill of materials" not in help_text
    for args in ([], ["a", "b"]):
        proc = run_module("data_pipeline.bom", *args, check=False)
        assert proc.returncode == 2 and "usage: python -m data_pipeline.bom" in proc.stderr, args
        assert "Traceback" not in proc.stderr


def test_hydra_args_translate_the_documented_spelling():
    assert hydra_args(["runs/x", "--json"]) == ["json=true", "path='runs/x'"]
    assert hydra_args(["path=runs/x", "--cfg", "job"]) == ["path=runs/x", "--cfg", "job"]
