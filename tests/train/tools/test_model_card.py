"""The model card train.export writes (README.md): architecture and size, tokenizer, training tokens, the data bill
of materials, the evaluation results on record, hardware and device-hours, and the license set by export.license."""

from __future__ import annotations

import json

import pytest

from tests.helpers import run_module
from train.tools.model_card import model_card

META = {"model": {"name": "tiny", "vocab_size": 8192, "d_model": 256, "n_layers": 4, "n_heads": 4, "n_kv_heads": 2,
                  "ffn_hidden": 704, "max_seq_len": 1024}, "tokenizer_sha256": "ab" * 32, "zero_stage": 2,
        "world_size": 8, "seq_len": 256, "step": 100, "tag": "step_00000100"}  # fmt: skip
BOM = {"sources": {
    "kowiki": {"license": "CC-BY-SA-3.0", "attribution": "Korean Wikipedia contributors", "language": "ko",
               "train_tokens": 540918, "val_tokens": 21957, "docs_kept": 333},
    "english_wiki": {"license": "CC-BY-SA-3.0", "attribution": "WikiText-2 (Merity et al. 2016)", "language": "en",
                     "train_tokens": 120000, "val_tokens": 3000, "docs_kept": 50},
    "nsmc": {"license": "CC0-1.0", "attribution": "e9t/nsmc", "language": "ko", "train_tokens": 332935,
             "val_tokens": 7541, "docs_kept": 15593}}}  # fmt: skip


def test_model_card_holds_what_the_run_knows(tmp_path):
    rows = [{"step": 50, "loss": 4.0, "tokens": 204800, "elapsed_s": 1800.0},
            {"step": 100, "loss": 3.5, "tokens": 409600, "elapsed_s": 3600.0,
             "downstream/kobest_copa/acc": 0.55, "downstream/kobest_copa/acc_norm": 0.5},
            {"step": 100, "val_loss": 3.2, "val_bpb": 1.234, "val_loss/kowiki": 3.1, "val_bpb/kowiki": 1.111,
             "tokens": 409600}]  # fmt: skip
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "bom.json").write_text(json.dumps(BOM))
    (tmp_path / "hardware.json").write_text(json.dumps({"device": "NVIDIA H100 80GB HBM3", "device_type": "cuda",
                                                        "world_size": 8, "nodes": 1}))  # fmt: skip
    (tmp_path / "lm_eval.json").write_text(json.dumps({
        "kobest_copa": {"score": 0.612, "metric": "acc", "metrics": {"acc": 0.612}, "n": 1000},
        "kobest_hellaswag": {"score": 0.41, "metric": "acc", "metrics": {"acc": 0.41}, "n": 500}}))  # fmt: skip
    (tmp_path / "evaluate.json").write_text(json.dumps({"data/eval/kowiki_heldout.txt": {"tokens": 900, "loss": 3.3,
                                                        "ppl": 27.1, "bytes": 4000, "bpb": 1.07}}))  # fmt: skip
    tok = {"name": "ko64k", "vocab_size": 65536, "sha256": "cd" * 32, "nfc_compiled": True}
    card = model_card(tmp_path, META, 5_048_576, "LlamaForCausalLM", tok, "apache-2.0")
    assert card.startswith("---\nlicense: apache-2.0\nlanguage:\n- en\n- ko\n")
    for text in ["`LlamaForCausalLM`", "| parameters | 5,048,576 |", "| layers | 4 |", "| vocabulary | 8,192 |",
                 "`ko64k`", "65,536 entries", "cd" * 32, "NFC normalization is compiled",
                 "training tokens: 409,600 (100 optimizer steps)",
                 "| kowiki | ko | CC-BY-SA-3.0 | Korean Wikipedia contributors | 540,918 | 21,957 | 333 |",
                 "| english_wiki | en | CC-BY-SA-3.0 | WikiText-2 (Merity et al. 2016) | 120,000 | 3,000 | 50 |",
                 "| nsmc | ko | CC0-1.0 | e9t/nsmc | 332,935 | 7,541 | 15,593 |",
                 "**1.234 bits per byte**", "| kowiki | 3.1 | 1.111 |", "| downstream/kobest_copa/acc | 0.55 |",
                 "| kobest_copa | acc | 0.612 | 1,000 |", "| kobest_hellaswag | acc | 0.41 | 500 |",
                 "| kowiki_heldout.txt | 900 | 3.3 | 1.07 |", "8 x NVIDIA H100 80GB HBM3 on 1 nodes",
                 "**8 GPU-hours**", "Weights: **apache-2.0**", "CC-BY-SA-3.0, CC0-1.0"]:  # fmt: skip
        assert text in card, text


def test_model_card_says_what_is_missing(tmp_path):
    card = model_card(tmp_path, META, 1000, "LlamaForCausalLM", {"vocab_size": 10, "sha256": "x"}, None)
    assert "license: other" in card and "Weights: **not set**" in card
    assert "not recorded" in card and "No bill of materials" in card and "No validation on record" in card


@pytest.mark.slow
def test_export_writes_the_model_card(trained_run, tmp_path):
    out = tmp_path / "hf"
    run_module("train.export", f"run.dir={trained_run}", f"out={out}", "export.license=cc-by-sa-4.0")
    card = (out / "README.md").read_text()
    assert card.startswith("---\nlicense: cc-by-sa-4.0\n") and "LlamaForCausalLM" in card
    assert "| kowiki |" in card and "bits per byte" in card and "cpu device-hours" in card
    assert "NFC normalization is compiled" in card  # the session's tokenizer was trained with the NFC map
