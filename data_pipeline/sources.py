"""Streaming readers for licensed sources (json, parquet, csv, text) and the license policy check."""

from __future__ import annotations

import glob
import os
import string
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from data_pipeline.config import DataConfig, SourceConfig

# Users' clusters are often offline and tests must never reach a hub.
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

_BUILDERS = {"json": "json", "parquet": "parquet", "csv": "csv", "text": "text"}


class LicenseError(ValueError):
    """A source has no license, or one the data config does not allow."""


@dataclass(frozen=True)
class Document:
    """One document of one source; `doc_id` is stable across runs (source, file index, row)."""

    source: str
    file_index: int
    row: int
    text: str

    @property
    def doc_id(self) -> str:
        return f"{self.source}:{self.file_index}:{self.row}"


def check_licenses(data: DataConfig) -> None:
    """Refuse, before any work, a source whose license is missing or not in `allowed_licenses`."""
    if not data.sources:
        raise ValueError("data config has no sources: add at least one under data.sources")
    for name, src in data.sources.items():
        if not src.license:
            raise LicenseError(
                f"data source {name!r} declares no license: set data.sources.{name}.license to an SPDX id "
                "or LicenseRef-... (sources without a license are refused)"
            )
        if src.license not in data.allowed_licenses:
            raise LicenseError(
                f"data source {name!r} has license {src.license!r}, which is not in data.allowed_licenses "
                f"{list(data.allowed_licenses)}: remove the source or allow its license deliberately"
            )


def resolve_files(name: str, src: SourceConfig) -> list[Path]:
    """Expand a source's globs into a sorted, de-duplicated file list; a pattern matching nothing is an error."""
    if not src.paths:
        raise ValueError(f"data source {name!r} has no paths: set data.sources.{name}.paths")
    files: list[Path] = []
    for pattern in src.paths:
        matched = sorted(glob.glob(os.path.expanduser(pattern), recursive=True))
        matched = [m for m in matched if os.path.isfile(m)]
        if not matched:
            raise FileNotFoundError(
                f"data source {name!r}: path {pattern!r} matches no file (working directory {os.getcwd()}); "
                f"fix data.sources.{name}.paths"
            )
        files.extend(Path(m) for m in matched)
    seen: set[Path] = set()
    return [f for f in files if not (f in seen or seen.add(f))]


def _template_fields(template: str) -> list[str]:
    return [f for _, f, _, _ in string.Formatter().parse(template) if f]


def _render(template: str, fields: list[str], row: dict) -> str | None:
    if len(fields) == 1 and template == "{" + fields[0] + "}" or not fields:
        key = fields[0] if fields else template
        value = row.get(key)
        return None if value is None else str(value)
    values = {}
    for f in fields:
        if row.get(f) is None:
            return None
        values[f] = str(row[f])
    return template.format(**values)


def iter_file(name: str, src: SourceConfig, path: Path) -> Iterator[dict | None]:
    """Yield rows of one file as dicts through `datasets` streaming (flat memory); text files yield one row."""
    import datasets  # lazy: heavy, and not needed by the trainer

    datasets.logging.set_verbosity_error()
    datasets.disable_progress_bars()
    kwargs = {"sample_by": "document"} if src.format == "text" else {}
    ds = datasets.load_dataset(_BUILDERS[src.format], data_files=[str(path)], split="train", streaming=True, **kwargs)
    yield from ds


def iter_source(name: str, src: SourceConfig, max_docs: int | None = None) -> Iterator[Document | None]:
    """Yield a source's documents in file order; a row without the text field yields None (counted by callers)."""
    template = src.text if "{" in src.text else "{" + src.text + "}"
    fields = _template_fields(template)
    n = 0
    for file_index, path in enumerate(resolve_files(name, src)):
        for row_index, row in enumerate(iter_file(name, src, path)):
            if max_docs is not None and n >= max_docs:
                return
            n += 1
            text = _render(template, fields, row) if row is not None else None
            yield None if text is None else Document(name, file_index, row_index, text)


def iter_texts(data: DataConfig, *, max_docs_per_source: int | None = None) -> Iterator[str]:
    """Yield the texts of all sources, interleaved in proportion to their weights (smooth weighted round robin)."""
    check_licenses(data)
    cap = max_docs_per_source if max_docs_per_source is not None else data.max_docs_per_source
    streams = {name: iter_source(name, src, cap) for name, src in data.sources.items() if src.weight > 0}
    weights = {name: data.sources[name].weight for name in streams}
    credit = dict.fromkeys(streams, 0.0)
    while streams:
        total = sum(weights[n] for n in streams)
        for n in streams:
            credit[n] += weights[n]
        pick = max(streams, key=lambda n: credit[n])
        credit[pick] -= total
        try:
            doc = next(streams[pick])
        except StopIteration:
            del streams[pick]
            continue
        if doc is not None and doc.text.strip():
            yield doc.text
