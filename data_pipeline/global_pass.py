"""The stages of `prepare` after the per-file work: dedup, plan, shards, manifest (run as engine tasks).

Every decision is the one a single pass in (source, file, row) order would make, so the output bytes are the same
for any engine, number of workers, nodes or parts:
  dedup   exact and near duplicates from bucketed sorted runs (dedup.py): reducers over bucket ranges, then one
          small resolve step from the duplicate groups alone -> the dropped ordinals with their reason
  plan    per file (per source when it has `max_tokens`, whose cap is a running total): the validation split, the
          mixture copies and cap, and the file's counts; its train and validation token totals place every
          document in the output streams before anything is written
  shards  each output shard written by its own task from the files it overlaps, hashed as it is written
  manifest  one small step, last: `manifest.json` from the files' counts and the shards' hashes
Task outputs go to OUT/work/stage-<fingerprint>/ atomically and are reused by a retry or relaunch of the same run.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from data_pipeline.config import DataConfig
from data_pipeline.dedup import (
    BUCKETS,
    EXACT,
    band_dtype,
    band_groups,
    eligible,
    exact_duplicates,
    lsh_params,
    read_range,
    resolve_near,
)
from data_pipeline.shards import FORMAT, MANIFEST
from data_pipeline.work import PII_KINDS, Task

RECORDS_PER_REDUCER = 1 << 19
"""Dedup records one reducer sorts (on average): its peak is about 40 MB for exact keys, 75 MB for band keys
(`python -m data_pipeline.bench_reducer`; 1 << 21 peaked at 170 and 300 MB, more than a Ray worker's own ~200 MB),
so a corpus that grows adds reducers, not memory per reducer (up to BUCKETS reducers)."""
NOT_IN_MANIFEST = ("num_workers", "num_shards", "shard_index", "engine", "ray_address")
"""How the job was split and where it ran: they do not change a byte of the output."""
DROPPED = ("exact_duplicate", "near_duplicate")


def is_validation(doc_id: str, val_fraction: float, seed: int) -> bool:
    """Deterministic held-out choice from the document's stable id."""
    digest = hashlib.blake2b(f"{seed}:{doc_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2**64 < val_fraction


def repeats(doc_id: str, weight: float, seed: int) -> int:
    """Copies of a training document under a mixture weight: floor(w), plus one with probability frac(w)."""
    digest = hashlib.blake2b(f"mix:{seed}:{doc_id}".encode(), digest_size=8).digest()
    whole = math.floor(weight)
    return whole + int(int.from_bytes(digest, "little") / 2**64 < weight - whole)


@dataclass(frozen=True)
class Context:
    """What every task of a run needs; sent once per worker process (or once into Ray's object store)."""

    data: DataConfig
    tok: object
    """The TextTokenizer (phase 1 only; None for the later stages)."""
    dtype: str
    out: str
    stage: str
    """OUT/work/stage-<fingerprint of the run>: where the stages after phase 1 write."""

    @property
    def work(self) -> Path:
        return Path(self.out) / "work"


def _save_atomic(path: Path, write) -> None:
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)


def _save_npy(path: Path, array: np.ndarray) -> None:
    def write(tmp: Path) -> None:
        with open(tmp, "wb") as fh:
            np.save(fh, array)

    _save_atomic(path, write)


def _save_npz(path: Path, **arrays: np.ndarray) -> None:
    def write(tmp: Path) -> None:
        with open(tmp, "wb") as fh:
            np.savez(fh, **arrays)

    _save_atomic(path, write)


def _fault(ctx: Context, stage: str, key: str) -> None:
    """Test hook: HANGANG_PREPARE_KILL=stage:key kills this worker process once (a marker file remembers it), as a
    lost node or an OOM kill would, in the middle of the stage (after a partial, unpublished write)."""
    want = os.environ.get("HANGANG_PREPARE_KILL")
    if want == f"{stage}:{key}":
        marker = Path(ctx.out) / f".killed-{stage}-{key}.marker"
        if not marker.exists():
            marker.touch()
            os.kill(os.getpid(), 9)


# ---- dedup ----


def reducer_ranges(total_records: int) -> list[tuple[int, int]]:
    """Contiguous bucket ranges, one per reducer, sized so each sorts about RECORDS_PER_REDUCER records."""
    n = max(1, min(BUCKETS, -(-total_records // RECORDS_PER_REDUCER)))
    edges = [round(i * BUCKETS / n) for i in range(n + 1)]
    return list(zip(edges[:-1], edges[1:], strict=True))


def _load_range(ctx: Context, kind: str, stems: list[str], lo: int, hi: int) -> np.ndarray:
    """Records of buckets [lo, hi) from every file's run of `kind` (exact or bands), concatenated."""
    _, rows = lsh_params(ctx.data.dedup.threshold, ctx.data.dedup.num_perm)
    parts = [np.zeros(0, EXACT if kind == "exact" else band_dtype(rows))]
    for stem in stems:
        path = ctx.work / f"{stem}.{kind}.npy"
        if path.exists():
            offsets = np.load(ctx.work / f"{stem}.{kind}.idx.npy")
            if offsets[hi] > offsets[lo]:
                parts.append(read_range(np.load(path, mmap_mode="r"), offsets, lo, hi))
    return np.concatenate(parts)


def exact_task(ctx: Context, arg) -> str:
    """Reducer: the exact duplicates among the buckets [lo, hi) of every file's exact run."""
    lo, hi, stems, limits = arg
    out = Path(ctx.stage) / f"exact_{lo:04d}.npy"
    if not out.exists():
        rec = _load_range(ctx, "exact", stems, lo, hi)
        rec = rec[eligible(rec["ord"], limits)]
        _fault(ctx, "dedup", str(lo))
        _save_npy(out, exact_duplicates(rec))
    return out.name


def near_task(ctx: Context, arg) -> str:
    """Reducer: the band groups (two or more documents, exact duplicates left out) among buckets [lo, hi)."""
    lo, hi, stems, limits = arg
    out = Path(ctx.stage) / f"near_{lo:04d}.npz"
    if not out.exists():
        exact = np.load(Path(ctx.stage) / "exact.npy")
        rec = _load_range(ctx, "bands", stems, lo, hi)
        rec = rec[eligible(rec["ord"], limits)]
        rec = rec[~np.isin(rec["ord"], exact, assume_unique=False)]
        _, rows = lsh_params(ctx.data.dedup.threshold, ctx.data.dedup.num_perm)
        groups, members = band_groups(rec, rows)
        _save_npz(out, groups=groups, members=members)
    return out.name


def dedup(ctx: Context, engine, tasks: list[Task], metas: list[dict], limits: np.ndarray, log=print) -> np.ndarray:
    """All stages of dedup; returns a structured array (ordinal, reason) of the dropped documents, sorted."""
    stage = Path(ctx.stage)
    done = stage / "dropped.npy"
    if done.exists():
        return np.load(done)
    stems = [t.stem for t in tasks]
    dedup_cfg = ctx.data.dedup
    exact = np.zeros(0, np.uint64)
    if dedup_cfg.exact:
        ranges = reducer_ranges(sum(m["kept"] for m in metas))
        names = engine.map(exact_task, [(lo, hi, stems, limits) for lo, hi in ranges], ctx, log=log, name="dedup")
        exact = np.sort(np.concatenate([np.load(stage / n) for n in names]))
    _save_npy(stage / "exact.npy", exact)
    near = np.zeros(0, np.uint64)
    if dedup_cfg.near:
        bands, _ = lsh_params(dedup_cfg.threshold, dedup_cfg.num_perm)
        records = sum(int(np.load(ctx.work / f"{s}.bands.idx.npy")[-1]) for s in stems)
        ranges = reducer_ranges(records)
        names = engine.map(near_task, [(lo, hi, stems, limits) for lo, hi in ranges], ctx, log=log, name="dedup")
        groups, members, base = [], [], 0
        for n in names:
            with np.load(stage / n) as z:
                groups.append(z["groups"] + base)
                members.append(z["members"])
                base += int(z["groups"].max()) + 1 if len(z["groups"]) else 0
        near = resolve_near(np.concatenate(groups), np.concatenate(members))
    dropped = np.zeros(len(exact) + len(near), [("ord", "<u8"), ("reason", "u1")])
    dropped["ord"] = np.concatenate([exact, near])
    dropped["reason"][len(exact) :] = 1
    dropped = dropped[np.argsort(dropped["ord"], kind="stable")]
    _save_npy(done, dropped)
    log(f"[prepare] dedup: {len(exact)} exact and {len(near)} near duplicates")
    return dropped


# ---- plan ----


def plan_task(ctx: Context, unit) -> list[dict]:
    """Decide every document of a run of files (one file, or a source's files when it has a token cap): dedup
    verdict, split, copies. Writes each file's plan (copies per kept document; val docs have copies -1) and, with
    data.write_text, its audit text; returns each file's counts."""
    source, files = unit  # files: [(task, rows counted under data.max_docs_per_source)]
    data = ctx.data
    src = data.sources[source]
    stage = Path(ctx.stage)
    results = []
    dropped = np.load(stage / "dropped.npy", mmap_mode="r")
    train_tokens = 0  # the source's running total: a capped source's files are one unit, in order
    for task, limit in files:
        out = stage / f"plan_{task.stem}.json"
        if out.exists():
            result = json.loads(out.read_text())
            train_tokens += result["train_tokens"]
            results.append(result)
            continue
        meta = json.loads((ctx.work / f"{task.stem}.json").read_text())
        with np.load(ctx.work / f"{task.stem}.npz") as npz:
            arrays = {key: npz[key] for key in npz.files}
        status = arrays["status"][:limit]
        lengths, rows = arrays["lengths"], arrays["rows"].tolist()
        lic, pii = arrays["licenses"].tolist(), arrays["pii"].tolist()
        base = np.uint64(task.index) << np.uint64(32)
        lo, hi = np.searchsorted(dropped["ord"], [base, base + np.uint64(1 << 32)])
        verdict = dict(zip((dropped["ord"][lo:hi] - base).tolist(), dropped["reason"][lo:hi].tolist(), strict=True))
        st = {"docs_in": int(len(status)), "docs_kept": 0, "train_tokens": 0, "val_tokens": 0, "unique_tokens": 0}
        rejected, licenses, pii_count = Counter(), Counter(), Counter()
        n_kept = int((status == 0).sum())
        copies = np.zeros(n_kept, np.int32)
        texts = open(ctx.work / f"{task.stem}.jsonl", encoding="utf-8") if data.write_text else None
        text_out = open(stage / f"text_{task.stem}.jsonl.tmp", "w", encoding="utf-8") if data.write_text else None
        k = -1
        for code in status.tolist():
            if code:
                rejected[meta["reasons"][code - 1]] += 1
                continue
            k += 1
            line = texts.readline() if texts is not None else None
            if k in verdict:
                rejected[DROPPED[verdict[k]]] += 1
                continue
            doc_id = f"{source}:{task.file_index}:{rows[k]}"
            held_out = is_validation(doc_id, data.val_fraction, data.seed)
            n = 1 if held_out else repeats(doc_id, src.weight, data.seed)
            reason = None
            if not held_out and src.max_tokens is not None and train_tokens + n * lengths[k] > src.max_tokens:
                n, reason = 0, "capped"
            if n == 0:
                rejected[reason or "mixture"] += 1
                continue
            copies[k] = -1 if held_out else n
            tokens = n * int(lengths[k])
            if not held_out:
                train_tokens += tokens
            st["val_tokens" if held_out else "train_tokens"] += tokens
            st["unique_tokens"] += int(lengths[k])
            st["docs_kept"] += 1
            licenses[meta["licenses"][lic[k]]] += 1
            for kind, c in zip(PII_KINDS, pii[k], strict=True):
                if c:
                    pii_count[kind] += c
            if line is not None:
                rec = json.loads(line)
                rec.update(split="val" if held_out else "train", copies=n)
                text_out.write(json.dumps(rec, ensure_ascii=False) + "\n")
        if texts is not None:
            texts.close()
            text_out.close()
            os.replace(stage / f"text_{task.stem}.jsonl.tmp", stage / f"text_{task.stem}.jsonl")
        _save_npy(stage / f"plan_{task.stem}.npy", copies)
        result = {
            "stem": task.stem,
            "source": source,
            "file": {"path": task.path, "bytes": meta["bytes"], "sha256": meta["sha256"]},
            **st,
            "rejected": dict(rejected),
            "licenses": dict(licenses),
            "pii": dict(pii_count),
        }
        _fault(ctx, "plan", str(task.index))
        _save_atomic(out, lambda p, r=result: p.write_text(json.dumps(r)))
        results.append(result)
    return results


def plan_units(data: DataConfig, tasks: list[Task], metas: list[dict]) -> list[tuple]:
    """Plan tasks: one per file, or one per source with a token cap (its running total orders its files)."""
    units = []
    for name, src in data.sources.items():
        files, counted = [], 0
        for task, meta in zip(tasks, metas, strict=True):
            if task.source != name:
                continue
            cap = data.max_docs_per_source
            limit = meta["docs_in"] if cap is None else max(0, min(meta["docs_in"], cap - counted))
            counted += limit
            files.append((task, limit))
        if src.max_tokens is not None:
            units.append((name, files))
        else:
            units.extend((name, [f]) for f in files)
    return units


def kept_limits(ctx: Context, units: list[tuple], n_tasks: int) -> np.ndarray:
    """Per file, how many of its kept documents fall inside data.max_docs_per_source (all of them without a cap)."""
    limits = np.zeros(n_tasks, np.int64)
    for _, files in units:
        for task, limit in files:
            with np.load(ctx.work / f"{task.stem}.npz") as npz:
                limits[task.index] = int((npz["status"][:limit] == 0).sum())
    return limits


# ---- shards ----


def shard_task(ctx: Context, spec: dict) -> dict:
    """Write one shard: tokens [start, end) of a split's stream, from the files (stem, offset) it overlaps."""
    name = spec["name"]
    marker = Path(ctx.stage) / f"shard_{name}.json"
    if marker.exists():
        return json.loads(marker.read_text())
    dtype = np.dtype(ctx.dtype)
    start, end, val = spec["start"], spec["end"], spec["val"]
    digest = hashlib.sha256()
    path = Path(ctx.out) / name
    tmp = path.with_name(name + ".tmp")
    with open(tmp, "wb") as fh:
        for stem, offset in spec["files"]:
            copies = np.load(Path(ctx.stage) / f"plan_{stem}.npy")
            with np.load(ctx.work / f"{stem}.npz") as npz:
                lengths = npz["lengths"]
            sel = copies == -1 if val else copies > 0
            n_out = np.where(sel, 1 if val else copies, 0).astype(np.int64)
            sizes = n_out * lengths
            ends = offset + np.cumsum(sizes)
            first = int(np.searchsorted(ends, start, side="right"))
            last = int(np.searchsorted(ends, end, side="left"))
            toks = np.memmap(ctx.work / f"{stem}.tok", dtype=dtype, mode="r") if lengths.sum() else None
            doc_starts = np.concatenate([[0], np.cumsum(lengths)])
            buf = []
            for k in range(first, min(last + 1, len(sizes))):
                if not sizes[k]:
                    continue
                doc = np.asarray(toks[doc_starts[k] : doc_starts[k + 1]])
                block = np.tile(doc, int(n_out[k])) if n_out[k] > 1 else doc
                s = int(ends[k] - sizes[k])
                block = block[max(0, start - s) : max(0, min(len(block), end - s))]
                buf.append(block)
            if buf:
                chunk = np.concatenate(buf).astype(dtype, copy=False).tobytes()
                fh.write(chunk)
                digest.update(chunk)
            del toks
        _fault(ctx, "shards", name)
    os.replace(tmp, path)
    result = {"file": name, "tokens": end - start, "sha256": digest.hexdigest()}
    _save_atomic(marker, lambda p: p.write_text(json.dumps(result)))
    return result


def shard_specs(prefix: str, files: list[tuple[str, int]], total: int, shard_tokens: int, val: bool) -> list[dict]:
    """Specs of the shards of one stream: files (stem, tokens), each shard `shard_tokens` long but the last."""
    ends = np.cumsum([n for _, n in files], dtype=np.int64)
    specs = []
    for i in range(-(-total // shard_tokens)):
        a, b = i * shard_tokens, min(total, (i + 1) * shard_tokens)
        over, j = [], int(np.searchsorted(ends, a, side="right"))  # the first file ending after a
        while j < len(files) and ends[j] - files[j][1] < b:
            if files[j][1]:
                over.append((files[j][0], int(ends[j] - files[j][1])))
            j += 1
        specs.append({"name": f"{prefix}_{i:05d}.bin", "start": a, "end": b, "files": over, "val": val})
    return specs


# ---- manifest ----


def finish(ctx: Context, engine, tasks: list[Task], metas: list[dict], tok_info: dict, log=print) -> dict:
    """Dedup, plan, shards, then manifest.json last; returns the manifest."""
    data, out = ctx.data, Path(ctx.out)
    units = plan_units(data, tasks, metas)
    limits = kept_limits(ctx, units, len(tasks))
    dropped_path = Path(ctx.stage) / "dropped.npy"
    if not dropped_path.exists():
        dedup(ctx, engine, tasks, metas, limits, log)
    plans = [r for rs in engine.map(plan_task, units, ctx, log=log, name="plan") for r in rs]
    by_stem = {p["stem"]: p for p in plans}
    ordered = [by_stem[t.stem] for t in tasks]
    train_files = [(p["stem"], p["train_tokens"]) for p in ordered]
    specs = shard_specs("train", train_files, sum(n for _, n in train_files), data.shard_tokens, False)
    for name in data.sources:
        val_files = [(p["stem"], p["val_tokens"]) for p in ordered if p["source"] == name]
        val_specs = shard_specs(f"val_{name}", val_files, sum(n for _, n in val_files), data.shard_tokens, True)
        specs += [{**s, "source": name} for s in val_specs]
    shards = engine.map(shard_task, specs, ctx, log=log, name="shards")
    train_shards = [s for s, spec in zip(shards, specs, strict=True) if not spec["val"]]
    val_shards = [{**s, "source": spec["source"]} for s, spec in zip(shards, specs, strict=True) if spec["val"]]
    sources = {}
    for name, src in data.sources.items():
        mine = [p for p in ordered if p["source"] == name]
        rejected, licenses, pii = Counter(), Counter(), Counter()
        for p in mine:
            rejected.update(p["rejected"])
            licenses.update(p["licenses"])
            pii.update(p["pii"])
        train, val = sum(p["train_tokens"] for p in mine), sum(p["val_tokens"] for p in mine)
        sources[name] = {
            "license": src.license,
            "attribution": src.attribution,
            "language": src.language,
            "weight": src.weight,
            "files": [p["file"] for p in mine],
            "docs_in": sum(p["docs_in"] for p in mine),
            "docs_kept": sum(p["docs_kept"] for p in mine),
            "rejected": dict(sorted(rejected.items())),
            "tokens": train + val,
            "train_tokens": train,
            "val_tokens": val,
            "unique_tokens": sum(p["unique_tokens"] for p in mine),
            "document_licenses": dict(sorted(licenses.items())),
            "pii_replaced": dict(sorted(pii.items())),
        }
        for p, meta in zip(ordered, metas, strict=True):
            # a file cut short by data.max_docs_per_source gave nothing by design; any other empty file is a warning
            if p["source"] == name and p["docs_kept"] == 0 and p["docs_in"] == meta["docs_in"]:
                log(f"[prepare] warning: {p['file']['path']} gave no documents ({_no_docs_reason(p)})")
        s = sources[name]
        log(
            f"[prepare] {name}: {s['docs_kept']}/{s['docs_in']} docs, {s['tokens']:,} tokens"
            + (f"; rejected: {format_reasons(s['rejected'])}" if s["rejected"] else "")
        )
        if data.write_text:
            (out / "text").mkdir(exist_ok=True)
            with open(out / "text" / f"{name}.jsonl", "wb") as fh:
                for p in mine:
                    with open(Path(ctx.stage) / f"text_{p['stem']}.jsonl", "rb") as part:
                        shutil.copyfileobj(part, fh)
    manifest = {
        "format": FORMAT,
        "dtype": ctx.dtype,
        "vocab_size": tok_info["vocab_size"],
        "eos_id": tok_info["eos_id"],
        "tokenizer": {"path": tok_info["path"], "sha256": tok_info["sha256"]},
        "splits": {
            "train": {"shards": train_shards, "tokens": sum(s["tokens"] for s in train_shards)},
            "val": {"shards": val_shards, "tokens": sum(s["tokens"] for s in val_shards)},
        },
        "sources": sources,
        "config": {k: v for k, v in asdict(data).items() if k not in NOT_IN_MANIFEST},
    }
    keep = {s["file"] for s in train_shards + val_shards}
    for old in out.glob("*.bin"):  # shards of an earlier run with more files must not linger
        if old.name not in keep:
            old.unlink()
    _save_atomic(out / MANIFEST, lambda p: p.write_text(json.dumps(manifest, indent=2, ensure_ascii=False)))
    shutil.rmtree(ctx.work, ignore_errors=True)
    return manifest


def format_reasons(rejected: Counter | dict) -> str:
    """Rejection counts, most frequent first: "near_duplicate 300, too_short 211"."""
    return ", ".join(f"{reason} {n:,}" for reason, n in sorted(rejected.items(), key=lambda kv: (-kv[1], kv[0])))


def _no_docs_reason(plan: dict) -> str:
    """Why a file contributed nothing: nothing read from it, or every document rejected (and for what)."""
    if plan["docs_in"] == 0:
        return "no rows read: an empty file, or not the source's format / text field?"
    return f"all {plan['docs_in']:,} rejected: {format_reasons(plan['rejected'])}"
