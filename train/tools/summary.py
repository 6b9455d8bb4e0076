"""`python -m train.summary RUN_DIR HF_DIR [EVAL_JSON]`: the demo's closing report and a Korean continuation.

Reads metrics.jsonl of the run, the evaluation results, and generates from the exported Hugging Face model with
transformers (so the continuation also proves the export loads and runs outside Hangang).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

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


def main(argv: list[str]) -> None:
    run_dir, hf_dir = Path(argv[0]), Path(argv[1])
    evals = json.loads(Path(argv[2]).read_text().strip().splitlines()[-1]) if len(argv) > 2 else {}
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


if __name__ == "__main__":
    main(sys.argv[1:])
