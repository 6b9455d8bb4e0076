"""Compression, round trip and speed of a tokenizer on text files, next to reference tokenizers.

    python -m tokenizer.evaluate tokenizer.path=DIR 'eval.files=[a.txt,b.jsonl]'

Per file and tokenizer: characters per token, UTF-8 bytes per token, tokens per eojeol (whitespace-separated word),
whether decode(encode(x)) == NFC(x) for every document, and encode throughput in MB/s of UTF-8 text with one
thread and with all cores. A .txt file is split into documents at blank lines; a .jsonl file gives one document
per line's "text" field, a .parquet file one per row of its "text" column. Text is NFC-normalized first, so every
tokenizer sees the same characters. The last line printed is one JSON object: {file: {tokenizer: metrics}}.

References: a directory or file holding a Hugging Face tokenizer.json, a SentencePiece .model file, a tiktoken
(Mistral "tekken") .json, or `pkg:PACKAGE/path` for one shipped inside an installed package. References that are
not present are skipped with a note, so the command runs without ../shared.
"""

from __future__ import annotations

import importlib.util
import json
import os
import sys
import time
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import hydra
import sentencepiece as spm
from omegaconf import DictConfig

from data_pipeline.cli import to_object_strict, user_errors
from tokenizer.config import TokenizerEvalConfig, TokenizerEvalRoot
from tokenizer.tokenizer import Tokenizer


@dataclass
class Encoder:
    """A tokenizer seen through the three calls measured: batch encode (with a thread count), decode, size."""

    name: str
    encode_batch: Callable[[list[str], int], list[list[int]]]
    """(texts, threads) -> ids; threads 1 = one thread, 0 = all cores."""
    decode: Callable[[list[int]], str]
    vocab_size: int


def ours(path: str | Path) -> Encoder:
    """The project's tokenizer (tokenizer.model) behind its own encode path."""
    tok = Tokenizer.from_dir(path)
    return Encoder(
        f"ours ({Path(path).name})", lambda t, n: tok.encode_batch(t, num_threads=n), tok.decode, tok.vocab_size
    )


def hf_fast(path: str | Path, name: str | None = None) -> Encoder:
    """A Hugging Face tokenizer.json with the `tokenizers` library (batch encoding is its thread pool)."""
    from tokenizers import Tokenizer as HFTokenizer

    p = Path(path)
    tok = HFTokenizer.from_file(str(p / "tokenizer.json" if p.is_dir() else p))

    def encode_batch(texts: list[str], threads: int) -> list[list[int]]:
        if threads == 1:
            return [tok.encode(t, add_special_tokens=False).ids for t in texts]
        return [e.ids for e in tok.encode_batch(texts, add_special_tokens=False)]

    return Encoder(name or f"hf {p.name}", encode_batch, tok.decode, tok.get_vocab_size())


def _sentencepiece(path: Path) -> Encoder:
    sp = spm.SentencePieceProcessor(model_file=str(path))
    cores = os.cpu_count() or 1
    return Encoder(
        f"spm {path.name}",
        lambda t, n: sp.encode(t, num_threads=n or cores),
        sp.decode,
        sp.get_piece_size(),
    )


def _tekken(path: Path) -> Encoder:
    from mistral_common.tokens.tokenizers.tekken import Tekkenizer

    enc = Tekkenizer.from_file(str(path))._model  # tiktoken: ids without Mistral's special-token offset
    cores = os.cpu_count() or 1
    return Encoder(
        f"tekken {path.name}",
        lambda t, n: enc.encode_ordinary_batch(t, num_threads=n or cores),
        enc.decode,
        enc.n_vocab,
    )


def reference(spec: str) -> Encoder | None:
    """Load a reference tokenizer from a path or `pkg:PACKAGE/path`; None (with a note) when it is not there."""
    path = Path(spec)
    if spec.startswith("pkg:"):
        package, _, rel = spec[4:].partition("/")
        found = importlib.util.find_spec(package)
        if found is None or not found.submodule_search_locations:
            print(f"[tokenizer.evaluate] skipping {spec}: package {package} not installed", file=sys.stderr)
            return None
        path = Path(list(found.submodule_search_locations)[0]) / rel
    if not path.exists():
        print(f"[tokenizer.evaluate] skipping {spec}: not found", file=sys.stderr)
        return None
    if path.is_dir() or path.name == "tokenizer.json":
        return hf_fast(path, f"hf {path.name if path.is_dir() else path.parent.name}")
    if ".model" in path.name:
        return _sentencepiece(path)
    if path.suffix == ".json" and "tekken" in path.name:
        return _tekken(path)
    return hf_fast(path)


def read_documents(path: str | Path, max_chars: int) -> list[str]:
    """NFC documents of a .txt (split at blank lines), .jsonl or .parquet ("text" field) file, up to max_chars."""
    p = Path(path)
    if p.suffix == ".parquet":
        import pyarrow.parquet as pq

        return _take((t for t in pq.read_table(p, columns=["text"]).column("text").to_pylist() if t), max_chars)
    if p.suffix == ".jsonl":
        with open(p, encoding="utf-8") as f:
            docs = (json.loads(line)["text"] for line in f if line.strip())
            return _take(docs, max_chars)
    return _take((d for d in p.read_text(encoding="utf-8").split("\n\n") if d.strip()), max_chars)


def _take(docs, max_chars: int) -> list[str]:
    out, n = [], 0
    for d in docs:
        d = unicodedata.normalize("NFC", d)[: max_chars - n]
        out.append(d)
        n += len(d)
        if n >= max_chars:
            break
    return out


def measure(enc: Encoder, docs: list[str], *, speed: bool = True) -> dict:
    """Compression and round trip of `enc` on docs; with speed, throughput in MB/s (one thread, all cores)."""
    chars = sum(map(len, docs))
    n_bytes = sum(len(d.encode("utf-8")) for d in docs)
    eojeol = sum(len(d.split()) for d in docs)
    start = time.perf_counter()
    ids = enc.encode_batch(docs, 0)
    all_cores_s = time.perf_counter() - start
    tokens = sum(map(len, ids))
    result = {
        "chars": chars,
        "tokens": tokens,
        "chars_per_token": round(chars / max(tokens, 1), 3),
        "bytes_per_token": round(n_bytes / max(tokens, 1), 3),
        "tokens_per_eojeol": round(tokens / max(eojeol, 1), 3),
        "round_trip": all(enc.decode(x) == d for x, d in zip(ids, docs, strict=True)),
        "vocab_size": enc.vocab_size,
    }
    if speed:
        start = time.perf_counter()
        enc.encode_batch(docs, 1)
        one_s = time.perf_counter() - start
        result["mb_per_s_1_thread"] = round(n_bytes / 1e6 / one_s, 2)
        result["mb_per_s_all_cores"] = round(n_bytes / 1e6 / all_cores_s, 2)
    return result


def format_table(results: dict[str, dict[str, dict]]) -> str:
    """A Markdown table: one row per (file, tokenizer)."""
    cols = ["file", "tokenizer", "vocab", "chars/token", "bytes/token", "tokens/eojeol", "round trip"]
    cols += ["MB/s 1 thread", "MB/s all cores"]
    rows = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for file, by_tok in results.items():
        for name, m in by_tok.items():
            rows.append(
                f"| {file} | {name} | {m['vocab_size']:,} | {m['chars_per_token']:.3f} | {m['bytes_per_token']:.3f} "
                f"| {m['tokens_per_eojeol']:.3f} | {'ok' if m['round_trip'] else 'FAIL'} "
                f"| {m.get('mb_per_s_1_thread', '-')} | {m.get('mb_per_s_all_cores', '-')} |"
            )
    return "\n".join(rows)


def evaluate(tokenizer_path: str, cfg: TokenizerEvalConfig) -> dict[str, dict[str, dict]]:
    """{file: {tokenizer name: metrics}} for ours and every reference found."""
    missing = [f for f in cfg.files if not Path(f).is_file()]
    if not cfg.files or missing:
        raise FileNotFoundError(f"eval.files: {missing or 'none given'}: pass existing files, eval.files=[a.txt]")
    encoders = [ours(tokenizer_path)] + [e for e in map(reference, cfg.references) if e is not None]
    results: dict[str, dict[str, dict]] = {}
    for f in cfg.files:
        docs = read_documents(f, cfg.max_chars)
        results[f] = {e.name: measure(e, docs, speed=cfg.speed) for e in encoders}
    return results


@hydra.main(config_path="../configs", config_name="tokenizer_evaluate", version_base="1.3")
def main(cfg: DictConfig) -> None:
    with user_errors():
        root: TokenizerEvalRoot = to_object_strict(cfg)
        if not root.tokenizer.path:
            raise ValueError("tokenizer.path is not set: pass tokenizer.path=DIR (a trained tokenizer directory)")
        results = evaluate(root.tokenizer.path, root.eval)
        print(format_table(results))
        if root.eval.out:
            Path(root.eval.out).write_text(json.dumps(results, indent=2, ensure_ascii=False) + "\n")
        print(json.dumps(results, ensure_ascii=False))


if __name__ == "__main__":
    main()
