"""Text cleaning (NFC, control characters) and Gopher-style quality filters, each naming what it rejects."""

from __future__ import annotations

import re
import unicodedata

import numpy as np

from data_pipeline.config import FilterConfig

# C0/C1 controls except tab and newline, plus BOM and zero-width spaces that survive copy-paste from the web.
_CONTROL = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\ufeff\u200b]")


def clean_text(text: str) -> str:
    """NFC, CRLF/CR to LF, control characters removed; indentation and newlines are kept (code, statutes)."""
    text = unicodedata.normalize("NFC", text)
    if "\r" in text:
        text = text.replace("\r\n", "\n").replace("\r", "\n")
    return _CONTROL.sub("", text)


_HANGUL = re.compile("[\uac00-\ud7a3\u1100-\u11ff\u3130-\u318f]")


def _class_table() -> np.ndarray:
    """Class of every BMP code point: 0 symbol, 1 letter, 2 Hangul letter, 3 digit, 4 whitespace (from str methods)."""
    table = np.zeros(0x10000, dtype=np.uint8)
    for cp in range(0x10000):
        ch = chr(cp)
        if ch.isspace():
            table[cp] = 4
        elif ch.isdigit():
            table[cp] = 3
        elif ch.isalpha():
            table[cp] = 2 if _HANGUL.match(ch) else 1
    return table


_CLASSES = _class_table()
_SHORT = 512  # below this many characters, per-call numpy overhead costs more than Python's str methods


def char_counts(text: str) -> dict[str, int]:
    """Counts of letters, Hangul, non-whitespace ("visible") and symbol characters (same rules for any length)."""
    cp = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32) if len(text) >= _SHORT else None
    if cp is not None and (len(cp) == 0 or int(cp.max()) < 0x10000):
        n = np.bincount(_CLASSES[cp], minlength=5)
        letters = int(n[1] + n[2])
        visible = len(text) - int(n[4])
        return {"letters": letters, "hangul": int(n[2]), "visible": visible, "symbols": int(n[0])}
    letters = sum(map(str.isalpha, text))
    visible = len(text) - sum(map(str.isspace, text))
    return {
        "letters": letters,
        "hangul": len(_HANGUL.findall(text)),
        "visible": visible,
        "symbols": visible - letters - sum(map(str.isdigit, text)),
    }


def hangul_share(text: str) -> float:
    """Hangul characters over all letters (Hanja and Latin count as letters, digits and punctuation do not)."""
    c = char_counts(text)
    return c["hangul"] / c["letters"] if c["letters"] else 0.0


def symbol_share(text: str) -> float:
    """Characters that are neither letters, digits nor whitespace, over non-whitespace characters."""
    c = char_counts(text)
    return c["symbols"] / c["visible"] if c["visible"] else 0.0


def dup_line_share(text: str) -> float:
    """Non-empty lines equal to an earlier line of the document, over non-empty lines (Gopher's dup_line_frac)."""
    if "\n" not in text:
        return 0.0
    lines = [line.strip() for line in text.split("\n")]
    lines = [line for line in lines if line]
    return (len(lines) - len(set(lines))) / len(lines) if lines else 0.0


def top_ngram_share(text: str, n: int = 3, min_words: int = 0) -> tuple[float, int]:
    """(characters covered by the most frequent word n-gram / characters in words, number of words); the share is
    0 below `min_words` words (not computed)."""
    words = text.split()
    if len(words) < max(n, min_words):
        return 0.0, len(words)
    # n-grams compared by a 64-bit combination of word hashes (numpy sort instead of a Counter of tuples, ~4x faster);
    # only equality matters, so the per-process seed of hash() cannot change a decision (barring 2^-64 collisions).
    h = np.fromiter(map(hash, words), dtype=np.int64, count=len(words)).view(np.uint64)
    with np.errstate(over="ignore"):
        grams = h[: len(h) - n + 1].copy()
        for i in range(1, n):
            grams = grams * np.uint64(0x100000001B3) ^ h[i : len(h) - n + 1 + i]
    _, inverse, counts = np.unique(grams, return_inverse=True, return_counts=True)
    lengths = np.fromiter(map(len, words), dtype=np.int64, count=len(words))
    gram_chars = sum(lengths[i : len(lengths) - n + 1 + i] for i in range(n))
    # Ties between equally frequent n-grams go to the longest, so no order (hash or otherwise) decides.
    covered = int((counts[inverse.ravel()] * gram_chars).max())
    return covered / max(1, int(lengths.sum())), len(words)


_P = np.uint64(0x100000001B3)
# Sentence-final punctuation (FineWeb's `line_punct` set, plus CJK and closing quotes), and the final syllables of
# Korean sentence endings (-다, -요, -죠, -까, -니, -네, -음/-함/-임/-됨): informal Korean often drops the period.
_TERMINAL = frozenset(".!?…\u3002！？\"'”’)]」』》〉:;")
_KO_ENDINGS = frozenset("다요죠까니네음함임됨")


def _gram_hashes(codes: np.ndarray, k: int) -> np.ndarray:
    """64-bit hashes of every window of k consecutive values (uint64 wraps by design; only equality matters)."""
    n = len(codes) - k + 1
    h = np.zeros(n, dtype=np.uint64)
    with np.errstate(over="ignore"):
        for i in range(k):
            h = h * _P ^ codes[i : i + n]
    return h


def char_repetition(text: str, k: int = 10) -> float:
    """Share of the character k-grams (whitespace removed) that repeat an earlier one: 1 - distinct / all."""
    s = "".join(text.split())
    if len(s) < k:
        return 0.0
    codes = np.frombuffer(s.encode("utf-32-le"), dtype=np.uint32).astype(np.uint64)
    grams = np.sort(_gram_hashes(codes, k))
    # Distinct values counted on a sorted copy: numpy 2's hash-based np.unique is ~25x slower on these arrays.
    distinct = 1 + int(np.count_nonzero(grams[1:] != grams[:-1]))
    return 1.0 - distinct / len(grams)


def word_repetition(words: list[str], n: int = 5) -> float:
    """Share of word characters inside word n-grams that occur more than once (Gopher's duplicate n-gram character
    fraction; each word counted once however many repeated n-grams cover it)."""
    if len(words) < n:
        return 0.0
    h = np.fromiter(map(hash, words), dtype=np.int64, count=len(words)).view(np.uint64)
    _, inverse, counts = np.unique(_gram_hashes(h, n), return_inverse=True, return_counts=True)
    starts = np.nonzero(counts[inverse.ravel()] > 1)[0]
    if not len(starts):
        return 0.0
    cover = np.zeros(len(words) + 1, dtype=np.int64)
    np.add.at(cover, starts, 1)
    np.add.at(cover, starts + n, -1)
    lengths = np.fromiter(map(len, words), dtype=np.int64, count=len(words))
    return float(lengths[np.cumsum(cover[:-1]) > 0].sum() / max(1, lengths.sum()))


def line_stats(text: str, short_chars: int) -> tuple[int, float, float]:
    """(non-empty lines, share ending a sentence, share shorter than `short_chars` characters)."""
    lines = [line.strip() for line in text.split("\n")]
    lines = [line for line in lines if line]
    if not lines:
        return 0, 0.0, 0.0
    ended = sum(line[-1] in _TERMINAL or line[-1] in _KO_ENDINGS for line in lines)
    short = sum(len(line) < short_chars for line in lines)
    return len(lines), ended / len(lines), short / len(lines)


def quality_reason(text: str, filters: FilterConfig, language: str) -> str | None:
    """The name of the first quality rule the (cleaned) text fails, or None when it passes.

    Character rules apply to every document; the document-statistics rules (word length, repetition, line shape)
    only from `filters.rules_min_chars` characters, and the prose rules (word length, line punctuation, short
    lines) not to `language: code`.
    """
    if len(text.strip()) < filters.min_chars:
        return "too_short"
    if len(text) > filters.max_chars:
        return "huge"
    if (filters.min_hangul_share > 0 and language == "ko") or filters.max_symbol_share < 1:
        c = char_counts(text)
        if language == "ko" and c["hangul"] < filters.min_hangul_share * c["letters"]:
            return "low_hangul"
        if c["symbols"] > filters.max_symbol_share * c["visible"]:
            return "symbols"
    long_doc = len(text) >= filters.rules_min_chars
    prose = long_doc and language != "code"
    if prose and filters.max_mean_word_length > 0:
        words = text.split()
        mean = sum(map(len, words)) / max(1, len(words))
        if not filters.min_mean_word_length <= mean <= filters.max_mean_word_length:
            return "word_length"
    if long_doc and filters.max_char_repetition < 1 and char_repetition(text) > filters.max_char_repetition:
        return "repeated_chars"
    if filters.max_dup_line_share < 1 and dup_line_share(text) > filters.max_dup_line_share:
        return "repeated_lines"
    if filters.max_top_ngram_share < 1 or filters.max_word_repetition < 1:
        words = text.split()
        if len(words) >= filters.ngram_min_words:
            if filters.max_top_ngram_share < 1 and top_ngram_share(text, 3)[0] > filters.max_top_ngram_share:
                return "repeated_ngrams"
            if filters.max_word_repetition < 1 and word_repetition(words) > filters.max_word_repetition:
                return "repeated_words"
    if prose and (filters.min_line_punct_share > 0 or filters.max_short_line_share < 1):
        lines, ended, short = line_stats(text, filters.short_line_chars)
        if lines >= filters.line_rules_min_lines:
            if ended < filters.min_line_punct_share:
                return "line_punctuation"
            if short > filters.max_short_line_share:
                return "short_lines"
    return None
