"""On-disk layout of RUN_DIR/checkpoints/: tags, manifests, verification, the `latest` pointer and retention.

Pure filesystem code (no torch.distributed, no DeepSpeed): read-only tools use it, and the collective save in
`train.checkpoint.collective` writes through it.

    latest                      the newest complete tag (moved last, by an atomic rename)
    step_00000050/              one tag per saved step
        mp_rank_*_model_states.pt, *_optim_states.pt   DeepSpeed: model, optimizer, LR schedule, client state
        model.safetensors       full fp32 weights with our parameter names (read by evaluate and export)
        meta.json               step, model config, execution config, tokenizer sha256, batch layout, ZeRO stage
        rng_rank{R}.pt          each rank's torch / numpy / python RNG states
        bom.json                the training data's bill of materials (data.path/manifest.json, copied)
        manifest.json           size and sha256 of every file above; written last, once all ranks have finished
        universal/              DeepSpeed universal checkpoint, made on demand when the world size or ZeRO stage changes
    .tmp-step_00000060/         a save in progress (or one a crash interrupted; removed by the next save)

A save writes into `.tmp-TAG/`, fsyncs every file, writes the manifest, renames the directory to `TAG/` and only then
moves `latest`. On resume, a checkpoint whose files do not match its manifest is skipped with a warning and the one
before it is used.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import sys
from collections.abc import Callable
from pathlib import Path

CKPT_MANIFEST = "manifest.json"
TMP_PREFIX = ".tmp-"
UNIVERSAL = "universal"
TAG_RE = re.compile(r"^step_(\d+)$")

FileOp = Callable[[str], None]
"""Called with a short description just before each file operation of a save (debug: kill points)."""


def _no_op(what: str) -> None:
    pass


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def step_of(tag: str) -> int | None:
    m = TAG_RE.match(tag)
    return int(m.group(1)) if m else None


def _warn(message: str) -> None:
    """Print once per job (rank 0; plan_run runs before the process group exists, so RANK is read from the env)."""
    if os.environ.get("RANK", "0") == "0":
        print(f"[checkpoint] {message}", file=sys.stderr, flush=True)


def _fsync_dir(path: Path) -> None:
    """Make a rename or a new entry in `path` durable (the file's own fsync does not cover its directory entry)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_synced(path: Path, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def sha256_of(path: Path, sync: bool = False) -> dict:
    """Size and sha256 of a file; with `sync`, fsynced first, so the manifest never vouches for unwritten bytes."""
    h, size = hashlib.sha256(), 0
    with open(path, "rb") as f:
        if sync:
            os.fsync(f.fileno())
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
            size += len(chunk)
    return {"size": size, "sha256": h.hexdigest()}


def verify(tag_dir: Path, hashes: bool = True) -> str | None:
    """None when `tag_dir` holds every file its manifest lists with the listed size (and sha256); else what is wrong."""
    if not tag_dir.is_dir():
        return "the directory does not exist"
    manifest = tag_dir / CKPT_MANIFEST
    if not manifest.is_file():
        return f"no {CKPT_MANIFEST} (its save did not finish)"
    try:
        files = json.loads(manifest.read_text())["files"]
    except (ValueError, KeyError, TypeError) as err:
        return f"unreadable {CKPT_MANIFEST} ({err})"
    for name, want in sorted(files.items()):
        path = tag_dir / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != want["size"]:
            return f"{name} has {path.stat().st_size} bytes, its manifest says {want['size']}"
        if hashes and sha256_of(path)["sha256"] != want["sha256"]:
            return f"{name} does not match the sha256 in its manifest"
    return None


def _tags(ckpt_dir: Path) -> list[str]:
    """Checkpoint tags under `ckpt_dir` (complete or not), oldest first."""
    found = [p.name for p in ckpt_dir.glob("step_*") if p.is_dir() and TAG_RE.match(p.name)]
    return sorted(found, key=step_of)


def pointer_tag(ckpt_dir: Path) -> str | None:
    """The tag `latest` names, unchecked."""
    pointer = ckpt_dir / "latest"
    return pointer.read_text().strip() if pointer.is_file() else None


def latest_tag(ckpt_dir: Path, verify_hashes: bool = True) -> str | None:
    """The newest complete checkpoint: the one `latest` names if it matches its manifest, else the newest older one
    that does (each one skipped is reported); None when there is none.

    Tags newer than `latest` are never chosen: they belong to an abandoned history (a resume from an older checkpoint).
    """
    ckpt_dir = Path(ckpt_dir)
    tags = _tags(ckpt_dir)[::-1]
    named = pointer_tag(ckpt_dir)
    if named is not None and step_of(named) is not None:
        tags = [named] + [t for t in tags if step_of(t) < step_of(named)]
    for tag in tags:
        reason = verify(ckpt_dir / tag, verify_hashes)
        if reason is None:
            return tag
        _warn(f"ignoring checkpoint {ckpt_dir / tag}: {reason}; trying the one before")
    return None


def read_meta(ckpt_dir: Path, tag: str) -> dict:
    return json.loads((ckpt_dir / tag / "meta.json").read_text())


def _remove(tag_dir: Path) -> None:
    """Delete a checkpoint, its manifest first, so that a crash midway leaves a directory resume ignores."""
    (tag_dir / CKPT_MANIFEST).unlink(missing_ok=True)
    shutil.rmtree(tag_dir, ignore_errors=True)


def retention_victims(ckpt_dir: Path, step: int, keep_last: int, keep_every: int) -> list[str]:
    """Tags to delete once `step` is saved: all up to `step` except the last `keep_last` (0 keeps all), every
    `keep_every`-th step and the one `latest` names. Tags past `step` (an abandoned history) are left alone: resume
    never picks them, and a save of the same step replaces them."""
    if keep_last <= 0:
        return []
    past = [t for t in _tags(ckpt_dir) if step_of(t) <= step]
    keep = set(past[-keep_last:])
    if keep_every > 0:
        keep |= {t for t in past if step_of(t) % keep_every == 0}
    keep.add(pointer_tag(ckpt_dir) or "")
    return [t for t in past if t not in keep]


def commit(ckpt_dir: Path, tmp: Path, tag: str, step: int, files: dict, keep_last: int, keep_every: int,
           file_op: FileOp = _no_op) -> None:  # fmt: skip
    """Make the finished save in `tmp` the checkpoint `tag`: manifest, rename, `latest`, then retention.

    Every file in `files` (name -> size and sha256) was written and fsynced by the rank that wrote it."""
    file_op(CKPT_MANIFEST)
    _write_synced(tmp / CKPT_MANIFEST, json.dumps({"tag": tag, "step": step, "files": files}, indent=2))
    _fsync_dir(tmp)
    final = ckpt_dir / tag
    if final.exists():  # left by an abandoned history (this run resumed from an older checkpoint)
        file_op(f"replace {tag}")
        _remove(final)
    file_op(f"rename to {tag}")
    os.rename(tmp, final)
    _fsync_dir(ckpt_dir)
    file_op("latest.tmp")
    _write_synced(ckpt_dir / "latest.tmp", tag)
    file_op("rename to latest")
    os.replace(ckpt_dir / "latest.tmp", ckpt_dir / "latest")
    _fsync_dir(ckpt_dir)
    for old in retention_victims(ckpt_dir, step, keep_last, keep_every):
        file_op(f"remove {old}")
        _remove(ckpt_dir / old)


def clear_interrupted(ckpt_dir: Path, file_op: FileOp = _no_op) -> None:
    """Remove saves that a crash interrupted (`.tmp-*` directories)."""
    for stale in ckpt_dir.glob(TMP_PREFIX + "*"):
        file_op(f"remove {stale.name}")
        shutil.rmtree(stale, ignore_errors=True)
