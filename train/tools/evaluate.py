"""`python -m train.evaluate run.dir=DIR eval.text_files=[a.txt,b.txt]`: loss, perplexity and bits per byte of text
files.

Each file is tokenized with the run's tokenizer, preceded by the tokenizer's eos (as every document but the first
follows one in the training shards), and scored in non-overlapping windows of `eval.seq_len` (default: the run's
train.seq_len): every token of the file is predicted once. The last line printed is one JSON object keyed by file
path: {"tokens": N, "loss": L, "ppl": P, "bytes": B, "bpb": b}, with N the file's token count, L the mean loss in
nats per token, B the UTF-8 bytes of the file's text and b = N * L / ln 2 / B, which compares across tokenizers.
The results are also merged into RUN_DIR/evaluate.json, which the model card of `train.export` reports.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import hydra
import torch
import torch.nn.functional as F
from omegaconf import DictConfig

from data_pipeline.cli import to_object_strict, user_errors
from model.accelerator import resolve_device
from train.checkpoint.weights import load_model
from train.config import EvaluateConfig
from train.tools import CONFIGS
from train.tools.run_dir import run_config, run_tokenizer


@torch.no_grad()
def score_ids(model, ids: list[int], seq_len: int, batch_size: int, device: torch.device) -> tuple[float, int]:
    """Summed next-token loss and number of predicted tokens over non-overlapping windows."""
    t = torch.tensor(ids, dtype=torch.long)
    windows = [t[i : i + seq_len + 1] for i in range(0, max(1, len(ids) - 1), seq_len)]
    windows = [w for w in windows if len(w) > 1]
    total, count = 0.0, 0
    for i in range(0, len(windows), batch_size):
        chunk = windows[i : i + batch_size]
        width = max(len(w) for w in chunk)
        x = torch.zeros(len(chunk), width - 1, dtype=torch.long)
        y = torch.full((len(chunk), width - 1), -100, dtype=torch.long)
        for j, w in enumerate(chunk):
            x[j, : len(w) - 1] = w[:-1]
            y[j, : len(w) - 1] = w[1:]
        logits = model(x.to(device)).logits.float()
        y = y.to(device)
        total += F.cross_entropy(logits.flatten(0, 1), y.flatten(), ignore_index=-100, reduction="sum").item()
        count += int((y != -100).sum())
    return total, count


def text_metrics(model, tok, text: str, seq_len: int, batch_size: int, device: torch.device) -> dict:
    """tokens, loss (nats per token), ppl, bytes (UTF-8 bytes of `text`) and bpb of one text, every token predicted
    once, the first after the tokenizer's eos."""
    ids = tok.encode(text)
    total, count = score_ids(model, [tok.eos_id, *ids], seq_len, batch_size, device)
    nbytes = len(text.encode("utf-8"))
    loss = total / count if count else float("nan")
    return {
        "tokens": len(ids),
        "loss": loss,
        "ppl": math.exp(loss) if count else float("nan"),
        "bytes": nbytes,
        "bpb": total / math.log(2) / nbytes if nbytes and count else float("nan"),
    }


def evaluate_files(run_dir: str, files: list[str], seq_len: int | None, batch_size: int, device: str) -> dict:
    """Per-file and overall next-token loss of the run's latest checkpoint on plain-text files."""
    missing = [f for f in files if not Path(f).is_file()]
    if not files or missing:
        raise FileNotFoundError(
            f"eval.text_files: {missing or 'none given'}: pass existing files, eval.text_files=[a.txt]"
        )
    dev = resolve_device(device)
    model, meta = load_model(run_dir)
    model.to(dev)
    tok, _ = run_tokenizer(run_dir, meta)
    seq_len = seq_len or run_config(run_dir)["train"]["seq_len"]
    results = {}
    for f in files:
        results[f] = r = text_metrics(model, tok, Path(f).read_text(encoding="utf-8"), seq_len, batch_size, dev)
        print(f"[evaluate] {f}: {r['tokens']} tokens, loss {r['loss']:.4f}, ppl {r['ppl']:.2f}, bpb {r['bpb']:.4f}",
              file=sys.stderr)  # fmt: skip
    return results


@hydra.main(config_path=CONFIGS, config_name="evaluate", version_base="1.3")
def main(raw: DictConfig) -> None:
    with user_errors():
        cfg: EvaluateConfig = to_object_strict(raw)
        e = cfg.eval
        results = evaluate_files(cfg.run.dir, list(e.text_files), e.seq_len, e.batch_size, e.device)
        # Kept beside the run for the model card (train.export), merged with earlier files' results.
        saved = Path(cfg.run.dir) / "evaluate.json"
        before = json.loads(saved.read_text()) if saved.is_file() else {}
        saved.write_text(json.dumps({**before, **results}, indent=2, ensure_ascii=False))
    print(json.dumps(results, ensure_ascii=False))


if __name__ == "__main__":
    main()
