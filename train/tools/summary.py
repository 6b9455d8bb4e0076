"""`python -m train.summary run=RUN_DIR hf=HF_DIR [eval=EVAL_JSON]` (also `RUN_DIR HF_DIR [EVAL_JSON]`): the demo's
closing report and a Korean continuation.

Reads metrics.jsonl of the run, the evaluation results, and generates from the exported Hugging Face model with
transformers (so the continuation also proves the export loads and runs outside Hangang).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

from data_pipeline.cli import hydra_quote, to_object_strict, user_errors
from train.config import SummaryRoot
from train.tools import CONFIGS
from train.tools.report import read_metrics

PROMPT = "대한민국의 역사는"


def generate(hf_dir: Path, prompt: str, max_new_tokens: int = 48, seed: int = 0) -> str:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(hf_dir)
    model = AutoModelForCausalLM.from_pretrained(hf_dir).eval()
    ids = tok(prompt, return_tensors="pt", add_special_tokens=False).input_ids
    torch.manual_seed(seed)
    out = model.generate(
        ids, max_new_tokens=max_new_tokens, do_sample=True, top_k=40, temperature=0.8, repetition_penalty=1.3
    )
    return tok.decode(out[0], skip_special_tokens=True)


USAGE = "usage: python -m train.summary run=RUN_DIR hf=HF_DIR [eval=EVAL_JSON]  (or RUN_DIR HF_DIR [EVAL_JSON])"


def hydra_args(args: list[str]) -> list[str]:
    """The positional `RUN_DIR HF_DIR [EVAL_JSON]` as Hydra overrides; flags and overrides pass through."""
    positional = [a for a in args if not a.startswith("-") and "=" not in a]
    if len(positional) > 3:
        raise ValueError(f"{USAGE}: got {len(positional)} positional arguments")
    rest = [a for a in args if a not in positional]
    return rest + [f"{key}={hydra_quote(v)}" for key, v in zip(("run", "hf", "eval"), positional, strict=False)]


def summarize(run: str, hf: str, eval_json: str | None) -> None:
    run_dir, hf_dir = Path(run), Path(hf)
    evals = json.loads(Path(eval_json).read_text().strip().splitlines()[-1]) if eval_json else {}
    rows = read_metrics(run_dir)
    train_rows = [r for r in rows if "loss" in r]
    vals = [r for r in rows if r.get("val_loss") is not None]
    rates = [r["tokens_per_s"] for r in train_rows[1:]] or [r["tokens_per_s"] for r in train_rows]
    first, last = vals[0]["val_loss"], vals[-1]["val_loss"]
    print("\n=== Hangang demo summary ===")
    print(f"steps            {train_rows[-1]['step']}  ({train_rows[-1]['tokens']:,} tokens)")
    print(f"train loss       {train_rows[0]['loss']:.3f} -> {train_rows[-1]['loss']:.3f}")
    print(f"validation loss  {first:.3f} -> {last:.3f}  ({100 * (first - last) / first:.1f}% lower)")
    print(f"tokens/s         {sum(rates) / len(rates):,.0f} (mean over steps, all ranks)")
    for path, r in evals.items():
        print(f"eval             {path}: loss {r['loss']:.3f}, ppl {r['ppl']:.1f} over {r['tokens']:,} tokens")
    print("outputs")
    for name, path in [
        ("run directory", run_dir),
        ("config", run_dir / "config.yaml"),
        ("metrics", run_dir / "metrics.jsonl"),
        ("checkpoints", run_dir / "checkpoints"),
        ("W&B (offline)", run_dir / "wandb"),
        ("Hugging Face export", hf_dir),
    ]:
        print(f"  {name:<20} {path}")
    text = generate(hf_dir, PROMPT)
    print(f"\nprompt      {PROMPT}\ncontinuation {text}")


@hydra.main(config_path=CONFIGS, config_name="summary", version_base="1.3")
def run_cli(raw: DictConfig) -> None:
    with user_errors():
        root: SummaryRoot = to_object_strict(raw)
        if not root.run or not root.hf:
            raise ValueError(USAGE)
        summarize(root.run, root.hf, root.eval)


def main() -> None:
    with user_errors():
        sys.argv[1:] = hydra_args(sys.argv[1:])
    run_cli()
