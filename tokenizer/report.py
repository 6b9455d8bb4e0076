"""report.json of a trained tokenizer: settings, sampled characters, vocabulary share per script, held-out scores."""

from __future__ import annotations

import json
import unicodedata
from collections import Counter
from dataclasses import asdict
from pathlib import Path

from sentencepiece import sentencepiece_model_pb2 as spm_pb2

from tokenizer.config import TokenizerConfig
from tokenizer.evaluate import measure, ours
from tokenizer.hf import SPACE, load_model_proto
from tokenizer.tokenizer import normalize

_Piece = spm_pb2.ModelProto.SentencePiece


def char_script(ch: str) -> str:
    """Coarse script of one character: hangul, latin, han, digit, space, or other."""
    if "\uac00" <= ch <= "\ud7a3" or "\u1100" <= ch <= "\u11ff" or "\u3130" <= ch <= "\u318f":
        return "hangul"
    if ch == SPACE or ch.isspace():
        return "space"
    if ch.isdigit():
        return "digit"
    if "\u4e00" <= ch <= "\u9fff" or "\u3400" <= ch <= "\u4dbf" or "\uf900" <= ch <= "\ufaff":
        return "han"
    if ch.isascii() and ch.isalpha() or unicodedata.name(ch, "").startswith("LATIN"):
        return "latin"
    return "other"


def piece_script(piece: str) -> str:
    """Script of a vocabulary piece: its letters' script (mixed when two), else space/digit/other."""
    scripts = {char_script(c) for c in piece} - {"space"}
    letters = scripts & {"hangul", "latin", "han"}
    if len(letters) > 1:
        return "mixed"
    if letters:
        return letters.pop()
    if scripts:
        return "other" if "other" in scripts else scripts.pop()
    return "space"


def vocab_share(model_path: str | Path) -> dict[str, float]:
    """Share of the vocabulary per script, plus `byte` (fallback) and `special` (control and user-defined)."""
    proto = load_model_proto(model_path)
    counts: Counter[str] = Counter()
    for p in proto.pieces:
        if p.type == _Piece.BYTE:
            counts["byte"] += 1
        elif p.type != _Piece.NORMAL:
            counts["special"] += 1
        else:
            counts[piece_script(p.piece)] += 1
    total = sum(counts.values())
    return {k: round(v / total, 4) for k, v in counts.most_common()}


def build_report(
    out_dir: Path,
    cfg: TokenizerConfig,
    data_name: str,
    budgets: dict[str, int],
    held_out: dict[str, list[str]],
    languages: dict[str, str],
    train_seconds: float,
    rejected: dict[str, Counter] | None = None,
) -> dict:
    """Evaluate the tokenizer in out_dir on held-out text per source and write out_dir/report.json.

    `rejected`: rows skipped per source and reason while reading (`rejected_rows`)."""
    enc = ours(out_dir)
    scores = {name: measure(enc, [normalize(d) for d in docs], speed=False) for name, docs in held_out.items()}
    by_language: dict[str, float] = {}
    for name, m in scores.items():
        lang = languages[name.removesuffix(" (unseen)")]
        by_language[lang] = min(by_language.get(lang, float("inf")), m["chars_per_token"])
    report = {
        "tokenizer": asdict(cfg),
        "data": data_name,
        "train_chars_per_source": budgets,
        "train_seconds": round(train_seconds, 1),
        "rejected_rows": {name: dict(sorted(c.items())) for name, c in (rejected or {}).items()},
        "vocab_size": enc.vocab_size,
        "vocab_share": vocab_share(out_dir / "tokenizer.model"),
        "held_out": scores,
        "min_chars_per_token_by_language": by_language,
    }
    (out_dir / "report.json").write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    return report
