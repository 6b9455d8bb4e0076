"""The model card (`README.md` of an exported Hugging Face directory) written from what the run knows.

Sources, all in the run directory: the checkpoint's meta.json (architecture, step, tokenizer hash), config.yaml
(tokenizer, batch layout), bom.json (the data bill of materials: every source with license, attribution and token
counts), metrics.jsonl (training tokens, wall time, the last validation loss and bits per byte, in-loop downstream
scores), lm_eval.json (`train.lm_eval`: KoBEST, NSMC, ...), evaluate.json (`train.evaluate`: per-file bpb) and
hardware.json (device and processes: device-hours = training wall time x processes). Nothing is invented: a
missing record is said to be missing.
"""

from __future__ import annotations

import json
from pathlib import Path

from model import accelerator
from model.config import ModelConfig
from model.flops import activated_params


def _read_json(path: Path):
    return json.loads(path.read_text()) if path.is_file() else None


def _rows(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def _num(v, digits: int = 4) -> str:
    if v is None:
        return "-"
    if isinstance(v, int) or (isinstance(v, float) and v.is_integer() and abs(v) >= 1000):
        return f"{int(v):,}"
    return f"{v:.{digits}g}"


def _params(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M" if n >= 1e6 else f"{n / 1e3:.1f}K"


def _front_and_license(meta: dict, n_params: int, architecture: str, sources: dict, license: str | None) -> list[str]:
    languages = sorted({s.get("language") for s in sources.values() if s.get("language")})
    front = ["---", f"license: {license or 'other'}"]
    if languages:
        front += ["language:", *[f"- {lang}" for lang in languages]]
    front += ["library_name: transformers", "pipeline_tag: text-generation", "tags:", "- hangang", "---", ""]
    name = meta["model"].get("name") or "model"
    out = [*front, f"# {name} (Hangang)", ""]
    out += [f"A {_params(n_params)}-parameter causal language model exported as `{architecture}` from checkpoint "
            f"`{meta['tag']}` (step {meta['step']}) of a Hangang pretraining run."]  # fmt: skip
    out += ["", "## License", ""]
    out += [f"Weights: **{license}** (set with `export.license`)." if license else
            "Weights: **not set** (`python -m train.export ... export.license=ID` sets it)."]  # fmt: skip
    data_licenses = sorted({s.get("license") for s in sources.values() if s.get("license")})
    if data_licenses:
        out += ["", f"The training data is under {', '.join(data_licenses)} (per source below); check that the "
                    "weights' license and use respect their terms (e.g. ShareAlike, attribution)."]  # fmt: skip
    return out


def _architecture(cfg: ModelConfig, meta: dict, n_params: int, architecture: str) -> list[str]:
    out = ["", "## Architecture and size", "", "| | |", "|---|---|"]
    out += [f"| class | `{architecture}` |", f"| parameters | {n_params:,} |"]
    if cfg.moe.enabled:
        out += [f"| activated parameters per token | {activated_params(cfg):,} |",
                f"| experts | {cfg.moe.n_routed_experts} routed (top-{cfg.moe.top_k}) + {cfg.moe.n_shared_experts} "
                "shared |"]  # fmt: skip
    out += [f"| layers | {cfg.n_layers} |", f"| hidden size | {cfg.d_model} |",
            f"| attention | {cfg.attention.upper()}, {cfg.n_heads} heads, {cfg.n_kv_heads} KV heads |",
            f"| context length | {cfg.max_seq_len} (trained at {meta.get('seq_len', '-')}) |",
            f"| vocabulary | {cfg.vocab_size:,} |", f"| tied embeddings | {cfg.tie_embeddings} |"]  # fmt: skip
    return out


def _tokenizer(tokenizer: dict) -> list[str]:
    out = ["", "## Tokenizer", ""]
    out += [f"`{tokenizer.get('name', '-')}`: {tokenizer.get('kind', 'SentencePiece')}, {tokenizer['vocab_size']:,} "
            f"entries, sha256 `{tokenizer['sha256']}`."]  # fmt: skip
    if tokenizer.get("nfc_compiled"):
        out[-1] += (" NFC normalization is compiled into `tokenizer.model`, so sentencepiece alone gives the ids "
                    "training used, as `AutoTokenizer` does.")  # fmt: skip
    elif tokenizer.get("nfc_compiled") is False:
        out[-1] += " Training applied Unicode NFC before SentencePiece: apply it before `tokenizer.model` too."
    return out


def _training(meta: dict, train_rows: list[dict], hardware: dict | None) -> list[str]:
    tokens = train_rows[-1]["tokens"] if train_rows else None
    elapsed = max((r.get("elapsed_s", 0.0) for r in train_rows), default=None)
    out = ["", "## Training", ""]
    out += [f"- training tokens: {_num(tokens)} ({meta['step']} optimizer steps)",
            f"- sequence length {meta.get('seq_len', '-')}, ZeRO stage {meta.get('zero_stage', '-')}, "
            f"{meta.get('world_size', '-')} processes"]  # fmt: skip
    if hardware and elapsed is not None:
        hours = elapsed * hardware["world_size"] / 3600
        kind = hardware.get("device_type") or "cpu"
        unit = "GPU-hours" if accelerator.is_accelerator(kind) else f"{kind} device-hours"
        nodes = f" on {hardware['nodes']} nodes" if hardware.get("nodes") else ""
        out += [f"- hardware: {hardware['world_size']} x {hardware['device']}{nodes}",
                f"- training wall time {elapsed / 3600:.3g} h: **{hours:.3g} {unit}** (x processes)"]  # fmt: skip
    else:
        out += ["- hardware and device-hours: not recorded by this run"]
    return out


def _data(sources: dict) -> list[str]:
    out = ["", "## Training data (bill of materials)", ""]
    if not sources:
        return [*out, "No bill of materials (bom.json) in the run directory."]
    out += ["| source | language | license | attribution | training tokens | validation tokens | documents kept |",
            "|---|---|---|---|---|---|---|"]  # fmt: skip
    for src, s in sources.items():
        counts = [_num(s.get(k)) for k in ("train_tokens", "val_tokens", "docs_kept")]
        out.append(f"| {src} | {s.get('language', '-')} | {s.get('license', '-')} | {s.get('attribution', '-')} | "
                   + " | ".join(counts) + " |")  # fmt: skip
    total = sum(s.get("train_tokens", 0) for s in sources.values())
    out += ["", f"Tokens in the prepared training split: {total:,} (`python -m data_pipeline.bom` prints the full "
                "record: input files with sha256, rejections by reason, PII replacements)."]  # fmt: skip
    return out


def _validation(train_rows: list[dict], val_rows: list[dict]) -> list[str]:
    if not val_rows:
        return ["No validation on record."]
    last = val_rows[-1]
    out = [f"Held-out validation at step {last['step']}: loss {_num(last['val_loss'])} nats/token, "
           f"**{_num(last.get('val_bpb'))} bits per byte** (bpb compares across tokenizers).", "",
           "| validation source | loss (nats/token) | bits per byte |", "|---|---|---|"]  # fmt: skip
    for k in sorted(k for k in last if k.startswith("val_loss/")):
        src = k.split("/", 1)[1]
        out.append(f"| {src} | {_num(last[k])} | {_num(last.get(f'val_bpb/{src}'))} |")
    downstream = {k: v for k, v in last.items() if k.startswith("downstream/")}
    in_loop = next((r for r in reversed(train_rows) if any(k.startswith("downstream/") for k in r)), None)
    downstream = {k: v for k, v in (in_loop or {}).items() if k.startswith("downstream/")} or downstream
    if downstream:
        out += ["", f"In-loop downstream (log-likelihood multiple choice, step {in_loop['step']}):", "",
                "| metric | value |", "|---|---|"]  # fmt: skip
        out += [f"| {k} | {_num(v)} |" for k, v in sorted(downstream.items())]
    return out


def _downstream(lm_eval: dict, evaluate: dict) -> list[str]:
    out = []
    if lm_eval:
        out += ["", "lm-evaluation-harness (`train.lm_eval`, zero-shot unless stated; KoBEST with the harness's own "
                    "task definitions on the KoBEST v1.0 files, CC-BY-SA-4.0, Kim et al., COLING 2022):", "",
                "| task | metric | score | examples |", "|---|---|---|---|"]  # fmt: skip
        out += [f"| {t} | {r.get('metric')} | {_num(r.get('score'))} | {_num(r.get('n'))} |"
                for t, r in lm_eval.items()]  # fmt: skip
    if evaluate:
        out += ["", "Text files (`train.evaluate`):", "", "| file | tokens | loss | bits per byte |",
                "|---|---|---|---|"]  # fmt: skip
        out += [f"| {Path(f).name} | {_num(r.get('tokens'))} | {_num(r.get('loss'))} | {_num(r.get('bpb'))} |"
                for f, r in evaluate.items()]  # fmt: skip
    if not lm_eval and not evaluate:
        out += ["", "No downstream evaluation on record (`python -m train.lm_eval run.dir=DIR tasks=[kobest]`)."]
    return out


def model_card(run_dir: str | Path, meta: dict, n_params: int, architecture: str, tokenizer: dict,
               license: str | None) -> str:  # fmt: skip
    """README.md text for the export of `run_dir`'s checkpoint `meta["tag"]` with `n_params` parameters."""
    run_dir = Path(run_dir)
    rows = _rows(run_dir)
    train_rows = [r for r in rows if "loss" in r and r["step"] <= meta["step"]]
    val_rows = [r for r in rows if r.get("val_loss") is not None and r["step"] <= meta["step"]]
    sources = (_read_json(run_dir / "bom.json") or {}).get("sources", {})
    out = _front_and_license(meta, n_params, architecture, sources, license)
    out += _architecture(ModelConfig.from_dict(meta["model"]), meta, n_params, architecture)
    out += _tokenizer(tokenizer)
    out += _training(meta, train_rows, _read_json(run_dir / "hardware.json"))
    out += _data(sources)
    out += ["", "## Evaluation", "", *_validation(train_rows, val_rows)]
    out += _downstream(_read_json(run_dir / "lm_eval.json") or {}, _read_json(run_dir / "evaluate.json") or {})
    out += ["", "## Limitations", "",
            "A pretrained base model: not instruction-tuned or safety-tuned; it continues text and may reproduce "
            "errors and biases of its training data."]  # fmt: skip
    return "\n".join(out) + "\n"
