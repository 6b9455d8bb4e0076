"""Per-file work of `prepare`, run in parallel processes: read, clean, filter, scrub PII, hash for dedup, tokenize.

Each input file gives one result under OUT/work/ (written atomically, `.json` last):
    {stem}.tok    the kept documents' tokens, each followed by EOS (dtype of the output)
    {stem}.npz    per row: status (0 kept, else 1 + reason index); per kept document: row, token count, license
                  index, PII replacements
    {stem}.exact.npy, {stem}.bands.npy (and .idx.npy bucket offsets): the kept documents' exact keys and LSH band
                  keys (documents long enough for near-dedup) as bucketed sorted runs (dedup.py)
    {stem}.jsonl  (data.write_text) the kept documents' cleaned text, in order
    {stem}.json   counts, reasons, licenses, input sha256, and the fingerprint of everything that shaped the result
Results depend only on the file and the config, never on which process or part made them, so the global pass
(`global_pass.py`) gives the same bytes for any data.num_workers or data.num_shards. A result whose fingerprint matches
is reused, which is how independently run parts are merged.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from data_pipeline.clean import clean_text, quality_reason
from data_pipeline.config import DataConfig
from data_pipeline.dedup import band_run, exact_key, exact_run, lsh_params, permutations, signature
from data_pipeline.pii import PLACEHOLDERS, scrub
from data_pipeline.shards import file_sha256
from data_pipeline.sources import Document, input_stat, iter_file_docs, open_input
from data_pipeline.text_tokenizer import TextTokenizer

WORK_FORMAT = "hangang-work-v2"
ENCODE_BATCH = 256
PII_KINDS = tuple(PLACEHOLDERS)


@dataclass(frozen=True)
class Task:
    """One input file: its global position in (source, file) order, and where its result goes."""

    index: int
    source: str
    file_index: int
    path: str

    @property
    def stem(self) -> str:
        return f"{self.index:06d}_{self.source}_{self.file_index:05d}"


def fingerprint(data: DataConfig, tok_sha256: str, task: Task) -> str:
    """Hash of every input of a file's result: the file's identity, its source config, filters, dedup, tokenizer."""
    size, changed = input_stat(task.path)
    parts = {
        "format": WORK_FORMAT,
        "task": asdict(task),
        "file": [size, changed],
        "source": asdict(data.sources[task.source]),
        "filters": asdict(data.source_filters(task.source)),
        "dedup": asdict(data.dedup),
        "pii": data.pii,
        "licenses": sorted(data.allowed_licenses),
        "max_docs": data.max_docs_per_source,
        "write_text": data.write_text,
        "tokenizer": tok_sha256,
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def result_is_current(work: Path, task: Task, fp: str) -> bool:
    meta = work / f"{task.stem}.json"
    return meta.is_file() and json.loads(meta.read_text()).get("fingerprint") == fp


class _Kept:
    """What one file's pass records: a status per document read (0 kept, else 1 + reason index), and for each kept
    document its row, licence, PII counts and dedup keys; tokens go to `{stem}.tok` in batches as they come."""

    def __init__(self, data: DataConfig, tok: TextTokenizer, dtype: str, tmp: dict[str, Path], threads: int):
        self.data, self.tok, self.dtype, self.threads = data, tok, dtype, threads
        self.perms = permutations(data.dedup.num_perm)
        self.reasons: list[str] = []
        self.licenses: list[str] = []
        self.status: list[int] = []
        self.rejected: Counter = Counter()
        self.rows, self.lengths, self.keys, self.sigs, self.has_sig, self.lic_idx, self.pii = [], [], [], [], [], [], []
        self.tok_fh = open(tmp["tok"], "wb")
        self.text_fh = open(tmp["jsonl"], "w", encoding="utf-8") if data.write_text else None
        self.batch: list[tuple[Document, str]] = []

    def reject(self, reason: str) -> None:
        if reason not in self.reasons:
            self.reasons.append(reason)
        self.status.append(1 + self.reasons.index(reason))
        self.rejected[reason] += 1

    def keep(self, doc: Document, text: str, lic: str, counts: Counter) -> None:
        dedup = self.data.dedup
        self.status.append(0)
        self.rows.append(doc.row)
        self.keys.append(np.frombuffer(exact_key(text), dtype=np.uint8))
        near = dedup.near and len(text) >= dedup.min_chars
        self.has_sig.append(near)
        if near:  # short documents get no signature (exact dedup only), and no row in `sigs`
            self.sigs.append(signature(text, dedup, self.perms))
        if lic not in self.licenses:
            self.licenses.append(lic)
        self.lic_idx.append(self.licenses.index(lic))
        self.pii.append([counts[k] for k in PII_KINDS])
        self.batch.append((doc, text))
        if len(self.batch) >= ENCODE_BATCH:
            self.flush()

    def flush(self) -> None:
        ids = self.tok.encode_batch([t for _, t in self.batch], num_threads=self.threads)
        for (doc, text), doc_ids in zip(self.batch, ids, strict=True):
            doc_ids.append(self.tok.eos_id)
            self.tok_fh.write(np.asarray(doc_ids, dtype=self.dtype).tobytes())
            self.lengths.append(len(doc_ids))
            if self.text_fh is not None:
                self.text_fh.write(json.dumps({"id": doc.doc_id, "text": text}, ensure_ascii=False) + "\n")
        self.batch.clear()

    def close(self) -> None:
        self.flush()
        self.tok_fh.close()
        if self.text_fh is not None:
            self.text_fh.close()


def _admit(item: Document, src, filters, data: DataConfig) -> tuple[str | None, str, str]:
    """(rejection reason or None, cleaned text, licence) of one document."""
    lic = item.license or src.license
    if lic not in data.allowed_licenses:
        return "license_not_allowed", "", lic
    if len(item.text) > filters.max_chars:
        return "huge", "", lic
    text = clean_text(item.text)
    if not text.strip():
        return "empty", "", lic
    return quality_reason(text, filters, src.language) or None, text, lic


def _write_dedup_runs(kept: _Kept, task: Task, data: DataConfig, work: Path) -> None:
    """The kept documents' exact keys and LSH band keys as bucketed sorted runs (atomically, one file each)."""
    n = len(kept.rows)
    ordinals = (np.uint64(task.index) << np.uint64(32)) | np.arange(n, dtype=np.uint64)
    runs = {}
    if data.dedup.exact:
        runs["exact"] = exact_run(np.stack(kept.keys) if n else np.zeros((0, 16), np.uint8), ordinals)
    if data.dedup.near:
        bands, width = lsh_params(data.dedup.threshold, data.dedup.num_perm)
        sig = np.stack(kept.sigs) if kept.sigs else np.zeros((0, data.dedup.num_perm), np.uint64)
        runs["bands"] = band_run(sig, ordinals[np.asarray(kept.has_sig, dtype=bool)], bands, width)
    for kind, (records, offsets) in runs.items():
        for suffix, array in ((kind, records), (f"{kind}.idx", offsets)):
            np.save(work / f"{task.stem}.{suffix}.tmp.npy", array)
            os.replace(work / f"{task.stem}.{suffix}.tmp.npy", work / f"{task.stem}.{suffix}.npy")


def process_file(task: Task, data: DataConfig, tok: TextTokenizer, dtype: str, work: Path, threads: int) -> dict:
    """Do the per-file work for one input file and write its result; returns the result's metadata."""
    src = data.sources[task.source]
    filters = data.source_filters(task.source)
    tmp = {ext: work / f"{task.stem}.{ext}.tmp" for ext in ("tok", "jsonl")}
    kept = _Kept(data, tok, dtype, tmp, threads)
    for item in iter_file_docs(task.source, src, task.file_index, task.path, data.max_docs_per_source):
        if not isinstance(item, Document):
            kept.reject(item.reason)
            continue
        reason, text, lic = _admit(item, src, filters, data)
        if reason:
            kept.reject(reason)
            continue
        counts: Counter = Counter()
        if data.pii:
            text = scrub(text, counts)
        kept.keep(item, text, lic, counts)
    kept.close()
    n = len(kept.rows)
    np.savez(
        work / f"{task.stem}.npz.tmp.npz",
        status=np.asarray(kept.status, dtype=np.int16),
        rows=np.asarray(kept.rows, dtype=np.int64),
        lengths=np.asarray(kept.lengths, dtype=np.int64),
        licenses=np.asarray(kept.lic_idx, dtype=np.int32),
        pii=np.asarray(kept.pii, dtype=np.int32).reshape(n, len(PII_KINDS)),
    )
    _write_dedup_runs(kept, task, data, work)
    os.replace(work / f"{task.stem}.npz.tmp.npz", work / f"{task.stem}.npz")
    os.replace(tmp["tok"], work / f"{task.stem}.tok")
    if data.write_text:
        os.replace(tmp["jsonl"], work / f"{task.stem}.jsonl")
    else:
        tmp["jsonl"].unlink(missing_ok=True)
    meta = {
        "fingerprint": fingerprint(data, tok.sha256, task),
        "task": asdict(task),
        "sha256": file_sha256(open_input(task.path)),
        "bytes": input_stat(task.path)[0],
        "reasons": kept.reasons,
        "licenses": kept.licenses,
        "docs_in": len(kept.status),
        "kept": n,
        "rejected": dict(kept.rejected),
    }
    (work / f"{task.stem}.json.tmp").write_text(json.dumps(meta))
    os.replace(work / f"{task.stem}.json.tmp", work / f"{task.stem}.json")
    return meta
