"""The global pass of `prepare`: dedup across all sources and files, validation split, mixture, shards, manifest.

Reads the per-file results of `work.py` in (source, file, row) order, so every decision (which copy of a duplicate
is kept, which documents are held out or repeated) is the same for any number of workers or parts. Run alone over
parts' results by `python -m data_pipeline.merge` (merge.py).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
from collections import Counter
from dataclasses import asdict
from pathlib import Path

import numpy as np

from data_pipeline.config import DataConfig
from data_pipeline.dedup import Deduplicator
from data_pipeline.shards import FORMAT, MANIFEST, ShardWriter
from data_pipeline.work import PII_KINDS, Task


def is_validation(doc_id: str, val_fraction: float, seed: int) -> bool:
    """Deterministic held-out choice from the document's stable id."""
    digest = hashlib.blake2b(f"{seed}:{doc_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2**64 < val_fraction


def repeats(doc_id: str, weight: float, seed: int) -> int:
    """Copies of a training document under a mixture weight: floor(w), plus one with probability frac(w)."""
    digest = hashlib.blake2b(f"mix:{seed}:{doc_id}".encode(), digest_size=8).digest()
    whole = math.floor(weight)
    return whole + int(int.from_bytes(digest, "little") / 2**64 < weight - whole)


def merge(
    data: DataConfig, tasks: list[Task], tok_info: dict, dtype: np.dtype, out: Path, *, log=print, ready=None
) -> dict:
    """Write shards and manifest.json from the per-file results in OUT/work/; returns the manifest.

    `ready(task)`, when given, blocks until that file's result exists: the global pass then overlaps phase 1.
    """
    work = out / "work"
    dedup = Deduplicator(data.dedup)
    train = ShardWriter(out, "train", dtype, data.shard_tokens)
    text_dir = out / "text"
    if data.write_text:
        text_dir.mkdir(exist_ok=True)
    sources: dict[str, dict] = {}
    val_shards: list[dict] = []
    for name, src in data.sources.items():
        val = ShardWriter(out, f"val_{name}", dtype, data.shard_tokens)
        text_fh = open(text_dir / f"{name}.jsonl", "w", encoding="utf-8") if data.write_text else None
        st = {"docs_in": 0, "docs_kept": 0, "rejected": Counter(), "train_tokens": 0, "val_tokens": 0}
        st.update(unique_tokens=0, pii=Counter(), licenses=Counter())
        files = []
        cap = data.max_docs_per_source
        for task in (t for t in tasks if t.source == name):
            if ready is not None:
                ready(task)
            meta = json.loads((work / f"{task.stem}.json").read_text())
            files.append({"path": task.path, "bytes": meta["bytes"], "sha256": meta["sha256"]})
            with np.load(work / f"{task.stem}.npz") as npz:
                arrays = {key: npz[key] for key in npz.files}  # NpzFile re-reads an array on every access
            status, lengths, keys, sigs = arrays["status"], arrays["lengths"], arrays["keys"], arrays["sigs"]
            has_sig = arrays["has_sig"].tolist()
            sig_index = (np.cumsum(arrays["has_sig"]) - 1).tolist()
            rows, lic, pii = arrays["rows"].tolist(), arrays["licenses"].tolist(), arrays["pii"].tolist()
            offsets = np.concatenate([[0], np.cumsum(lengths)])
            # One read per file: slicing an in-memory array per document is several times cheaper than a memmap.
            toks = np.fromfile(work / f"{task.stem}.tok", dtype=dtype) if offsets[-1] else None
            texts = open(work / f"{task.stem}.jsonl", encoding="utf-8") if text_fh is not None else None
            k = -1
            file_in, file_kept, file_rejected = st["docs_in"], st["docs_kept"], st["rejected"].copy()
            capped = False
            for code in status.tolist():
                if cap is not None and st["docs_in"] >= cap:
                    capped = True
                    break
                st["docs_in"] += 1
                if code:
                    st["rejected"][meta["reasons"][code - 1]] += 1
                    continue
                k += 1
                line = texts.readline() if texts is not None else None
                reason = dedup.check(keys[k].tobytes(), sigs[sig_index[k]] if has_sig[k] else None)
                if reason:
                    st["rejected"][reason] += 1
                    continue
                doc_id = f"{name}:{task.file_index}:{rows[k]}"
                held_out = is_validation(doc_id, data.val_fraction, data.seed)
                n = 1 if held_out else repeats(doc_id, src.weight, data.seed)
                if not held_out and src.max_tokens is not None and st["train_tokens"] + n * lengths[k] > src.max_tokens:
                    n = 0
                    reason = "capped"
                if n == 0:
                    st["rejected"][reason or "mixture"] += 1
                    continue
                doc = toks[offsets[k] : offsets[k + 1]]
                for _ in range(n):
                    (val if held_out else train).write(doc)
                st["val_tokens" if held_out else "train_tokens"] += n * int(lengths[k])
                st["unique_tokens"] += int(lengths[k])
                st["docs_kept"] += 1
                st["licenses"][meta["licenses"][lic[k]]] += 1
                for kind, c in zip(PII_KINDS, pii[k], strict=True):
                    if c:
                        st["pii"][kind] += c
                if line is not None:
                    rec = json.loads(line)
                    rec.update(split="val" if held_out else "train", copies=n)
                    text_fh.write(json.dumps(rec, ensure_ascii=False) + "\n")
            if texts is not None:
                texts.close()
            del toks
            if st["docs_kept"] == file_kept and not capped:
                log(f"[prepare] warning: {task.path} gave no documents ({_no_docs_reason(st, file_in, file_rejected)})")
        if text_fh is not None:
            text_fh.close()
        for shard in val.close():
            val_shards.append({**shard, "source": name})
        sources[name] = {
            "license": src.license,
            "attribution": src.attribution,
            "language": src.language,
            "weight": src.weight,
            "files": files,
            "docs_in": st["docs_in"],
            "docs_kept": st["docs_kept"],
            "rejected": dict(sorted(st["rejected"].items())),
            "tokens": st["train_tokens"] + st["val_tokens"],
            "train_tokens": st["train_tokens"],
            "val_tokens": st["val_tokens"],
            "unique_tokens": st["unique_tokens"],
            "document_licenses": dict(sorted(st["licenses"].items())),
            "pii_replaced": dict(sorted(st["pii"].items())),
        }
        log(
            f"[prepare] {name}: {st['docs_kept']}/{st['docs_in']} docs, {sources[name]['tokens']:,} tokens"
            + (f"; rejected: {format_reasons(st['rejected'])}" if st["rejected"] else "")
        )
    train_shards = train.close()
    manifest = {
        "format": FORMAT,
        "dtype": dtype.name,
        "vocab_size": tok_info["vocab_size"],
        "eos_id": tok_info["eos_id"],
        "tokenizer": {"path": tok_info["path"], "sha256": tok_info["sha256"]},
        "splits": {
            "train": {"shards": train_shards, "tokens": sum(s["tokens"] for s in train_shards)},
            "val": {"shards": val_shards, "tokens": sum(s["tokens"] for s in val_shards)},
        },
        "sources": sources,
        # How the job was split (workers, parts) is left out: it does not change a byte of the output.
        "config": {k: v for k, v in asdict(data).items() if k not in ("num_workers", "num_shards", "shard_index")},
    }
    tmp = out / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=2, ensure_ascii=False))
    os.replace(tmp, out / MANIFEST)
    shutil.rmtree(work, ignore_errors=True)
    return manifest


def format_reasons(rejected: Counter | dict) -> str:
    """Rejection counts, most frequent first: "near_duplicate 300, too_short 211"."""
    return ", ".join(f"{reason} {n:,}" for reason, n in sorted(rejected.items(), key=lambda kv: (-kv[1], kv[0])))


def _no_docs_reason(st: dict, file_in: int, file_rejected: Counter) -> str:
    """Why a file contributed nothing: nothing read from it, or every document rejected (and for what)."""
    read = st["docs_in"] - file_in
    if read == 0:
        return "no rows read: an empty file, or not the source's format / text field?"
    return f"all {read:,} rejected: {format_reasons(st['rejected'] - file_rejected)}"
