"""Text cleaning (NFC, control characters) and Gopher-style quality filters, each naming what it rejects."""

from __future__ import annotations

import re
import unicodedata
from collections import Counter

from data_pipeline.config import FilterConfig

# C0/C1 controls except tab and newline, plus BOM and zero-width spaces that survive copy-paste from the web.
_CONTROL = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\ufeff\u200b]")
_HANGUL = re.compile("[\uac00-\ud7a3\u1100-\u11ff\u3130-\u318f]")
_WORD = re.compile(r"\S+")


def clean_text(text: str) -> str:
    """NFC, CRLF/CR to LF, control characters removed; indentation and newlines are kept (code, statutes)."""
    text = unicodedata.normalize("NFC", text)
    if "\r" in text:
        text = text.replace("\r\n", "\n").replace("\r", "\n")
    return _CONTROL.sub("", text)


def hangul_share(text: str) -> float:
    """Hangul characters over all letters (Hanja and Latin count as letters, digits and punctuation do not)."""
    letters = sum(1 for c in text if c.isalpha())
    return len(_HANGUL.findall(text)) / letters if letters else 0.0


def symbol_share(text: str) -> float:
    """Characters that are neither letters, digits nor whitespace, over non-whitespace characters."""
    visible = [c for c in text if not c.isspace()]
    if not visible:
        return 0.0
    return sum(1 for c in visible if not c.isalnum()) / len(visible)


def dup_line_share(text: str) -> float:
    """Non-empty lines equal to an earlier line of the document, over non-empty lines (Gopher's dup_line_frac)."""
    lines = [line.strip() for line in text.split("\n")]
    lines = [line for line in lines if line]
    return (len(lines) - len(set(lines))) / len(lines) if lines else 0.0


def top_ngram_share(text: str, n: int = 3) -> tuple[float, int]:
    """(characters covered by the most frequent word n-gram / characters in words, number of words)."""
    words = _WORD.findall(text)
    if len(words) < n:
        return 0.0, len(words)
    counts = Counter(zip(*(words[i:] for i in range(n)), strict=False))
    gram, count = counts.most_common(1)[0]
    total = sum(len(w) for w in words)
    return count * sum(len(w) for w in gram) / total, len(words)


def quality_reason(text: str, filters: FilterConfig, language: str) -> str | None:
    """The name of the first quality rule the (cleaned) text fails, or None when it passes."""
    if len(text.strip()) < filters.min_chars:
        return "too_short"
    if len(text) > filters.max_chars:
        return "huge"
    if filters.min_hangul_share > 0 and language == "ko" and hangul_share(text) < filters.min_hangul_share:
        return "low_hangul"
    if filters.max_symbol_share < 1 and symbol_share(text) > filters.max_symbol_share:
        return "symbols"
    if filters.max_dup_line_share < 1 and dup_line_share(text) > filters.max_dup_line_share:
        return "repeated_lines"
    if filters.max_top_ngram_share < 1:
        share, words = top_ngram_share(text)
        if words >= filters.ngram_min_words and share > filters.max_top_ngram_share:
            return "repeated_ngrams"
    return None
