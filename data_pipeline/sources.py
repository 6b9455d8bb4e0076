"""Streaming readers for licensed sources (json lines, parquet, csv, text) and the license policy check."""

from __future__ import annotations

import csv
import glob
import io
import json
import os
import string
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from data_pipeline.config import DataConfig, SourceConfig


class LicenseError(ValueError):
    """A source has no license, or one the data config does not allow."""


@dataclass(frozen=True)
class Document:
    """One document of one source; `doc_id` is stable across runs (source, file index, row)."""

    source: str
    file_index: int
    row: int
    text: str
    license: str | None = None
    """The row's own license (SourceConfig.license_field), when the source has one."""

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


def is_url(path: str | Path) -> bool:
    """A remote (or any fsspec) location such as s3://bucket/x.jsonl, hf://..., memory://...: read through fsspec."""
    return "://" in str(path)


def open_input(path: str | Path):
    """A binary file object for a local path or an fsspec URL (streamed: nothing is downloaded whole)."""
    if is_url(path):
        import fsspec  # only remote inputs pay for its import

        return fsspec.open(str(path), "rb").open()
    return open(path, "rb")


def input_stat(path: str | Path) -> tuple[int, str]:
    """(size in bytes, a change marker: mtime for local files, the store's ETag/mtime/checksum for URLs)."""
    if not is_url(path):
        st = os.stat(path)
        return st.st_size, str(st.st_mtime_ns)
    import fsspec

    fs, inner = fsspec.core.url_to_fs(str(path))
    info = fs.info(inner)
    marker = next((str(info[k]) for k in ("ETag", "etag", "mtime", "LastModified", "created", "md5") if k in info), "")
    return int(info.get("size") or 0), marker


def resolve_files(name: str, src: SourceConfig) -> list[Path | str]:
    """Expand a source's globs (local, or fsspec URLs) into a sorted, de-duplicated file list; a pattern matching
    nothing is an error."""
    if not src.paths:
        raise ValueError(f"data source {name!r} has no paths: set data.sources.{name}.paths")
    files: list[Path | str] = []
    for pattern in src.paths:
        if is_url(pattern):
            import fsspec

            fs, inner = fsspec.core.url_to_fs(pattern)
            found = sorted(p for p in fs.glob(inner) if fs.isfile(p))
            if found:
                files.extend(fs.unstrip_protocol(p) for p in found)
                continue
            matched = []
        else:
            matched = sorted(glob.glob(os.path.expanduser(pattern), recursive=True))
            matched = [m for m in matched if os.path.isfile(m)]
        if not matched:
            raise FileNotFoundError(
                f"data source {name!r}: path {pattern!r} matches no file (working directory {os.getcwd()}); "
                f"fix data.sources.{name}.paths"
            )
        files.extend(Path(m) for m in matched)
    seen: set[Path | str] = set()
    return [f for f in files if not (f in seen or seen.add(f))]


def _template_fields(template: str) -> list[str]:
    return [f for _, f, _, _ in string.Formatter().parse(template) if f]


def _render(template: str, fields: list[str], row: dict) -> str | None:
    """The document's text, None when a field is missing, NOT_STRING when one is not a string (a JSON number or
    list in the text field is not text: it is rejected as `text_not_string`, not stringified)."""
    if len(fields) == 1 and template == "{" + fields[0] + "}" or not fields:
        key = fields[0] if fields else template
        value = row.get(key)
        return None if value is None else value if isinstance(value, str) else NOT_STRING
    values = {}
    for f in fields:
        if row.get(f) is None:
            return None
        if not isinstance(row[f], str):
            return NOT_STRING
        values[f] = row[f]
    return template.format(**values)


NOT_STRING = "\0not a string"  # a sentinel no reader can produce: cleaning removes NUL, so no text starts with it


@dataclass(frozen=True)
class Rejected:
    """A row that could not become a document, with the reason it is counted under."""

    reason: str


def _iter_jsonl(path: Path) -> Iterator[dict | Rejected]:
    # Our own line reader: the `datasets` JSON builder fails the whole file on one bad line.
    with open_input(path) as fh:
        for raw in fh:
            if not raw.strip():
                continue
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                yield Rejected("invalid_utf8")
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                yield Rejected("malformed_json")
                continue
            yield row if isinstance(row, dict) else Rejected("malformed_json")


def _iter_parquet(path: Path, columns: list[str] | None = None) -> Iterator[dict]:
    import pyarrow.parquet as pq  # only parquet sources pay for its import (~0.1 s)

    pf = pq.ParquetFile(open_input(path))
    if columns is not None:  # read only what the text template and license field need
        columns = [c for c in columns if c in pf.schema_arrow.names] or None
    for batch in pf.iter_batches(batch_size=4096, columns=columns):
        yield from batch.to_pylist()


def _iter_csv(path: Path) -> Iterator[dict | Rejected]:
    with io.TextIOWrapper(open_input(path), encoding="utf-8", errors="strict", newline="") as fh:
        reader = csv.DictReader(fh)
        while True:
            try:
                row = next(reader)
            except StopIteration:
                return
            except UnicodeDecodeError:
                yield Rejected("invalid_utf8")
                return  # the decoder's position is lost; the rest of the file cannot be trusted
            except csv.Error:
                yield Rejected("malformed_csv")
                continue
            yield row


def _iter_text(path: Path) -> Iterator[dict | Rejected]:
    with open_input(path) as fh:
        raw = fh.read()
    try:
        yield {"text": raw.decode("utf-8")}
    except UnicodeDecodeError:
        yield Rejected("invalid_utf8")


_READERS = {"json": _iter_jsonl, "parquet": _iter_parquet, "csv": _iter_csv, "text": _iter_text}


def iter_file(name: str, src: SourceConfig, path: Path | str) -> Iterator[dict | Rejected]:
    """Stream the rows of one file (flat memory): json lines, parquet row batches, csv rows, or a whole text file.

    A bad row yields Rejected(reason) and reading goes on; a file that cannot be opened or parsed at all yields
    one Rejected("unreadable_file") after whatever rows it gave.
    """
    try:
        if src.format == "parquet":
            template = src.text if "{" in src.text else "{" + src.text + "}"
            columns = _template_fields(template) + ([src.license_field] if src.license_field else [])
            yield from _iter_parquet(path, columns)
        else:
            yield from _READERS[src.format](path)
    except (OSError, ValueError):  # pyarrow's ArrowInvalid is a ValueError, its IO errors are OSErrors
        yield Rejected("unreadable_file")


def iter_file_docs(
    name: str, src: SourceConfig, file_index: int, path: Path | str, max_docs: int | None = None
) -> Iterator[Document | Rejected]:
    """Documents (or rejections) of one file; a row without the text field is Rejected("missing_text")."""
    template = src.text if "{" in src.text else "{" + src.text + "}"
    fields = _template_fields(template)
    for row_index, row in enumerate(iter_file(name, src, path)):
        if max_docs is not None and row_index >= max_docs:
            return
        if isinstance(row, Rejected):
            yield row
            continue
        text = _render(template, fields, row)
        if text is None or text is NOT_STRING:
            yield Rejected("missing_text" if text is None else "text_not_string")
            continue
        lic = row.get(src.license_field) if src.license_field else None
        yield Document(name, file_index, row_index, text, str(lic) if lic else None)


def iter_source(name: str, src: SourceConfig, max_docs: int | None = None) -> Iterator[Document | Rejected]:
    """Yield a source's documents (or rejections) in file order, at most `max_docs` items."""
    n = 0
    for file_index, path in enumerate(resolve_files(name, src)):
        for item in iter_file_docs(name, src, file_index, path):
            if max_docs is not None and n >= max_docs:
                return
            n += 1
            yield item


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
        if isinstance(doc, Document) and doc.text.strip():
            if doc.license is None or doc.license in data.allowed_licenses:
                yield doc.text
