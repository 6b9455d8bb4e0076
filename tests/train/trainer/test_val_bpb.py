"""In-loop validation reports bits per byte (`val_bpb`, `val_bpb/SOURCE`) in metrics.jsonl and W&B, and the value
equals a recomputation from the checkpoint's weights, the validation shards and the tokenizer's byte table."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from data_pipeline.loader import PackedSequences, iter_eval_batches
from tokenizer.tokenizer import Tokenizer
from train.checkpoint.weights import load_model

pytestmark = pytest.mark.slow  # uses the 2-process torchrun run


def test_val_bpb_is_logged_and_exact(trained_run, tiny_tokenizer, tiny_data):
    rows = [json.loads(line) for line in (trained_run / "metrics.jsonl").read_text().splitlines()]
    val = [r for r in rows if "val_loss" in r]
    assert [r["step"] for r in val] == [0, 5, 10]
    for r in val:
        assert 0 < r["val_bpb"] < 20 and any(k.startswith("val_bpb/") for k in r)
        assert {k.split("/", 1)[1] for k in r if k.startswith("val_bpb/")} == {
            k.split("/", 1)[1] for k in r if k.startswith("val_loss/")
        }
    # Recompute step 10's val_bpb on one process: the same 8 sequences (train.eval_sequences=8) the 2 ranks shared.
    model, meta = load_model(trained_run)
    assert meta["step"] == 10
    table = torch.tensor(Tokenizer.from_dir(tiny_tokenizer).token_bytes())
    data = PackedSequences(tiny_data, "val", 64)
    nats, nbytes = 0.0, 0
    with torch.no_grad():
        for x, y in iter_eval_batches(data, 2, 8, 0, 1):
            nats += F.cross_entropy(model(x).logits.double().flatten(0, 1), y.flatten(), reduction="sum").item()
            nbytes += int(table[y].sum())
    assert math.isclose(val[-1]["val_bpb"], nats / math.log(2) / nbytes, rel_tol=1e-4)
    # W&B (offline) got the same keys (other offline runs there may be later additions, e.g. lm_eval's scores).
    wandb_files = list((trained_run / "wandb").glob("offline-run-*/run-*.wandb"))
    assert any(b"val_bpb" in f.read_bytes() and b"val_bpb/" in f.read_bytes() for f in wandb_files)
