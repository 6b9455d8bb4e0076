"""Bits per byte: train.evaluate's per-file bpb against a hand computation, the tokenizer's byte table, and
train.report ranking runs of different tokenizers by bpb."""

from __future__ import annotations

import json
import math
import shutil

import torch
import yaml

from model.config import ModelConfig
from model.transformer import Transformer
from tokenizer.tokenizer import Tokenizer
from train.tools.evaluate import text_metrics
from train.tools.report import write_report

TEXT = "한국어 문장을 바이트로 셉니다. 대한민국은 민주공화국이다.\nbits per byte, 3.14 😀 ①\n"


def test_token_bytes_add_up_to_the_decoded_text(tiny_tokenizer):
    tok = Tokenizer.from_dir(tiny_tokenizer)
    table = tok.token_bytes()
    assert len(table) == tok.vocab_size and table[tok.eos_id] == 0 and table[tok.pad_id] == 0
    for text in (TEXT, "  앞 공백과 뒤 공백  ", "<s></s> <|fim_prefix|> 혼합", "ᄒᆞᆫ글 옛한글 𝔘 \t\n"):
        ids = tok.encode(text)
        assert sum(table[i] for i in ids) == len(tok.decode(ids).encode("utf-8"))


def test_evaluate_bpb_equals_a_hand_computation(tiny_tokenizer):
    tok = Tokenizer.from_dir(tiny_tokenizer)
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=tok.vocab_size, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2,
                                    ffn_hidden=128, max_seq_len=256)).eval()  # fmt: skip
    ids = [tok.eos_id, *tok.encode(TEXT)]
    nbytes = len(TEXT.encode("utf-8"))
    assert nbytes > len(TEXT) + 40  # Hangul is 3 bytes, the emoji 4: the byte count is not the character count
    for seq_len in (7, 256):
        # By hand: windows of seq_len + 1 tokens overlapping by one, each scored alone; every text token once.
        nats = 0.0
        for start in range(0, len(ids) - 1, seq_len):
            w = ids[start : start + seq_len + 1]
            with torch.no_grad():
                logp = torch.log_softmax(model(torch.tensor([w[:-1]])).logits.double()[0], -1)
            nats -= sum(logp[i, w[i + 1]].item() for i in range(len(w) - 1))
        hand = nats / math.log(2) / nbytes
        got = text_metrics(model, tok, TEXT, seq_len, 4, torch.device("cpu"))
        assert got["bytes"] == nbytes and got["tokens"] == len(ids) - 1
        assert math.isclose(got["bpb"], hand, rel_tol=1e-5), (got["bpb"], hand)
        assert math.isclose(got["loss"], nats / (len(ids) - 1), rel_tol=1e-5)


def _fake_run(root, name, tok_dir, val_loss, val_bpb):
    d = root / name
    d.mkdir(parents=True)
    cfg = {"tokenizer": {"path": str(tok_dir)}, "data": {"path": "same"}, "train": {"max_steps": 2,
           "global_batch_tokens": 8}, "run": {"dir": str(d)}}  # fmt: skip
    (d / "config.yaml").write_text(yaml.safe_dump(cfg))
    rows = [{"step": 2, "loss": 3.0, "tokens": 16, "tokens_per_s": 1.0, "mfu": 0.1, "elapsed_s": 1.0},
            {"step": 2, "val_loss": val_loss, "val_bpb": val_bpb, "val_bpb/ko": val_bpb, "tokens": 16}]  # fmt: skip
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_report_ranks_runs_of_different_tokenizers_by_bpb(tiny_tokenizer, tmp_path):
    other_tok = tmp_path / "other_tok"
    shutil.copytree(tiny_tokenizer, other_tok)
    (other_tok / "tokenizer.model").write_bytes((other_tok / "tokenizer.model").read_bytes() + b"\0")
    # Lower nats per token (a smaller vocabulary packs less text per token) but higher bits per byte.
    _fake_run(tmp_path / "runs", "a_small_vocab", tiny_tokenizer, 2.0, 1.30)
    _fake_run(tmp_path / "runs", "b_large_vocab", other_tok, 3.0, 1.10)
    text = write_report([str(tmp_path / "runs")], tmp_path / "out").read_text()
    assert "different tokenizers" in text and "ranked by final validation bits per byte (val_bpb)" in text
    table = [line for line in text.splitlines() if line.startswith("| ")]
    assert "final val bpb" in table[0] and "bpb ko" in table[0]
    assert table[1].startswith("| b_large_vocab") and table[2].startswith("| a_small_vocab")
