"""Morpheme-aware pre-segmentation of training text with kiwipiepy (`tokenizer.pre_segment=kiwi`).

Only training text is cut: SentencePiece learns pieces from lines, so cutting a line at every morpheme boundary
inside a Korean word keeps any learned piece within one morpheme (as Polyglot-Ko, EXAONE and HyperCLOVA did with
their analyzers). Encoding applies the learned pieces to uncut text and never needs the analyzer.
"""

from __future__ import annotations

from collections.abc import Iterator


def _is_hangul(ch: str) -> bool:
    return "\uac00" <= ch <= "\ud7a3"


class MorphemeCutter:
    """Cuts lines at morpheme boundaries between two Hangul syllables (kiwipiepy; `pip install kiwipiepy`)."""

    def __init__(self, num_workers: int = 0) -> None:
        try:
            from kiwipiepy import Kiwi
        except ImportError as err:
            raise ImportError(
                "tokenizer.pre_segment=kiwi needs kiwipiepy: pip install kiwipiepy (or pip install -e .[tokenizer])"
            ) from err
        self._kiwi = Kiwi(num_workers=num_workers if num_workers > 0 else -1)

    def cuts(self, lines: list[str]) -> Iterator[list[str]]:
        """For each line, its pieces (joined they give the line back exactly)."""
        for line, tokens in zip(lines, self._kiwi.tokenize(iter(lines)), strict=True):
            # Kiwi restores contracted forms (갔 -> 가 + 었), so overlapping spans are skipped: only a boundary
            # where one morpheme ends exactly where the next starts, inside a run of Hangul, is cut.
            cut_at = [
                b.start
                for a, b in zip(tokens, tokens[1:], strict=False)
                if a.start + a.len == b.start
                and 0 < b.start < len(line)
                and _is_hangul(line[b.start - 1])
                and _is_hangul(line[b.start])
            ]
            pieces, prev = [], 0
            for at in cut_at:
                if at > prev:
                    pieces.append(line[prev:at])
                    prev = at
            pieces.append(line[prev:])
            yield pieces
