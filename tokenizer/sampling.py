"""Training text for a tokenizer: each source gets its weight's share of the character budget, minus held-out text.

Kept here, not in data_pipeline/: the pretraining mixture interleaves documents by weight, while a tokenizer needs a
fixed number of characters per source (a source's share of the vocabulary follows its share of characters).
"""

from __future__ import annotations

import sys
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass

from tqdm import tqdm

from data_pipeline.config import DataConfig
from data_pipeline.sources import Rejected, iter_source

HELD_OUT_EVERY = 20
"""Every 20th document of a training source (by position in the source) is held out for evaluation."""


@dataclass(frozen=True)
class Split:
    """Which sources are trained on, with their character budgets, and which are only evaluated."""

    budgets: dict[str, int]
    held_out_sources: list[str]


def plan(data: DataConfig, max_chars: int, held_out_sources: list[str]) -> Split:
    """Character budget per training source: max_chars * weight / sum of the training sources' weights.

    Held-out names that the data config lacks are ignored with a note, so ko64k (written for data=shared_all)
    also runs on data=ko_sample.
    """
    unknown = [s for s in held_out_sources if s not in data.sources]
    if unknown:
        print(
            f"[tokenizer.train] tokenizer.held_out_sources {unknown} are not sources of data config {data.name!r} "
            f"(its sources: {sorted(data.sources)}); ignored",
            file=sys.stderr,
        )
    held_out = [s for s in held_out_sources if s in data.sources]
    train = {n: s.weight for n, s in data.sources.items() if n not in held_out and s.weight > 0}
    if not train:
        raise ValueError("no training source: every source is held out or has weight 0")
    total = sum(train.values())
    return Split({n: int(max_chars * w / total) for n, w in train.items()}, held_out)


def is_held_out(index: int) -> bool:
    """Whether a training source's document number `index` is held out of training (for report.json)."""
    return index % HELD_OUT_EVERY == HELD_OUT_EVERY - 1


def rejection(data: DataConfig, doc) -> str | None:
    """Why a source item is not training text (prepare's reasons: the reader's, `license_not_allowed`, `empty`)."""
    if isinstance(doc, Rejected):
        return doc.reason
    if doc.license is not None and doc.license not in data.allowed_licenses:
        return "license_not_allowed"
    if not doc.text.strip():
        return "empty"
    return None


def source_texts(data: DataConfig, name: str, rejected: Counter | None = None) -> Iterator[tuple[int, str]]:
    """(document number, text) of one source's usable documents, in file order (data.max_docs_per_source).

    Rows that cannot be used (malformed JSON, invalid UTF-8, no text, license not allowed, empty) are skipped and
    counted by reason in `rejected`.
    """
    index = 0
    for doc in iter_source(name, data.sources[name], data.max_docs_per_source):
        reason = rejection(data, doc)
        if reason is not None:
            if rejected is not None:
                rejected[reason] += 1
            continue
        yield index, doc.text
        index += 1


def training_texts(
    data: DataConfig, split: Split, *, progress: bool = True, rejected: dict[str, Counter] | None = None
) -> Iterator[str]:
    """Each training source's documents (held-out ones skipped) until its budget; the last one is cut to fit.

    Rows rejected on the way are counted per source and reason in `rejected` (and shown on the progress bar).
    """
    rejected = {} if rejected is None else rejected
    bar = tqdm(
        total=sum(split.budgets.values()),
        unit="char",
        unit_scale=True,
        file=sys.stderr,
        disable=not progress,
        mininterval=2,
    )
    try:
        for name, budget in split.budgets.items():
            bar.set_description(f"sampling {name}")
            left = budget
            counts = rejected.setdefault(name, Counter())
            for index, text in source_texts(data, name, counts):
                if is_held_out(index):
                    continue
                if counts:
                    bar.set_postfix(rejected=sum(counts.values()), refresh=False)
                text = text[:left]
                yield text
                bar.update(len(text))
                left -= len(text)
                if left <= 0:
                    break
            if left > 0:  # a small source gives all it has; its unused share is not handed to the others
                bar.write(f"[tokenizer.train] {name}: all {budget - left:,} chars used (budget {budget:,})")
    finally:
        bar.close()


def held_out_texts(
    data: DataConfig, split: Split, max_chars: int, rejected: dict[str, Counter] | None = None
) -> dict[str, list[str]]:
    """Evaluation text per source, up to max_chars each: held-out documents of training sources
    (key `NAME`), and the start of every held-out source (key `NAME (unseen)`, whose rejected rows are counted in
    `rejected`; a training source's were counted while sampling)."""
    out: dict[str, list[str]] = {}
    for name in list(split.budgets) + split.held_out_sources:
        unseen = name in split.held_out_sources
        counts = rejected.setdefault(name, Counter()) if unseen and rejected is not None else None
        texts, n = [], 0
        for index, text in source_texts(data, name, counts):
            if unseen or is_held_out(index):
                texts.append(text[: max_chars - n])
                n += len(texts[-1])
                if n >= max_chars:
                    break
        if texts:
            out[f"{name} (unseen)" if unseen else name] = texts
    return out
