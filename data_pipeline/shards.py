"""Token shards on disk: a writer that hashes as it goes, and memory-mapped readers."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

MANIFEST = "manifest.json"
FORMAT = "hangang-shards-v1"


def file_sha256(path) -> str:
    """Hex SHA-256 of a file's bytes (a path, or an open binary file object, which is closed)."""
    digest = hashlib.sha256()
    with open(path, "rb") if isinstance(path, (str, Path)) else path as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits, else uint32."""
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


class ShardWriter:
    """Appends token arrays to `{prefix}_{i:05d}.bin` files of at most `shard_tokens` tokens each."""

    def __init__(self, out_dir: Path, prefix: str, dtype: np.dtype, shard_tokens: int) -> None:
        self.out_dir, self.prefix, self.dtype, self.shard_tokens = out_dir, prefix, dtype, shard_tokens
        self.shards: list[dict] = []
        self._fh = None
        self._hash = None
        self._n = 0
        self._pending: list[np.ndarray] = []  # documents buffered into one write (same bytes, far fewer calls)
        self._pending_n = 0

    def _open(self) -> None:
        name = f"{self.prefix}_{len(self.shards):05d}.bin"
        self._fh = open(self.out_dir / name, "wb")
        self._hash = hashlib.sha256()
        self.shards.append({"file": name, "tokens": 0, "sha256": ""})
        self._n = 0

    def _close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self.shards[-1].update(tokens=self._n, sha256=self._hash.hexdigest())
            self._fh = None

    def write(self, tokens: np.ndarray) -> None:
        self._pending.append(np.asarray(tokens, dtype=self.dtype))
        self._pending_n += self._pending[-1].size
        if self._pending_n >= 1 << 20:
            self._flush()

    def _flush(self) -> None:
        if not self._pending:
            return
        tokens = np.concatenate(self._pending)
        self._pending, self._pending_n = [], 0
        while tokens.size:
            if self._fh is None or self._n >= self.shard_tokens:
                self._close()
                self._open()
            take = min(tokens.size, self.shard_tokens - self._n)
            chunk = tokens[:take].tobytes()
            self._fh.write(chunk)
            self._hash.update(chunk)
            self._n += take
            tokens = tokens[take:]

    def close(self) -> list[dict]:
        self._flush()
        self._close()
        return self.shards


def read_manifest(data_dir: str | Path) -> dict:
    """Load `manifest.json` of a prepared directory, with a clear error when it is not one."""
    path = Path(data_dir) / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(
            f"no prepared data at {str(data_dir)!r} (missing {MANIFEST}): run "
            f"`python -m data_pipeline.prepare data=NAME tokenizer.path=TOK out={data_dir}` first, or fix data.path"
        )
    manifest = json.loads(path.read_text())
    if manifest.get("format") != FORMAT:
        raise ValueError(f"{path} has format {manifest.get('format')!r}, expected {FORMAT!r}: re-run prepare")
    return manifest


def _check_size(path: Path, shard: dict, dtype: np.dtype) -> None:
    want = shard["tokens"] * dtype.itemsize
    if not path.is_file():
        raise FileNotFoundError(
            f"data shard {path} is missing (its {MANIFEST} lists {shard['tokens']:,} tokens): restore it or re-run "
            "`python -m data_pipeline.prepare` into that directory"
        )
    size = path.stat().st_size
    if size != want:
        raise ValueError(
            f"data shard {path} is damaged: {size:,} bytes, its {MANIFEST} expects {want:,} ({shard['tokens']:,} "
            f"{dtype.name} tokens); restore it or re-run `python -m data_pipeline.prepare` into that directory"
        )


def check_shards(data_dir: str | Path, manifest: dict, verify_hashes: bool = True) -> None:
    """Every shard of every split against `manifest.json`: present, of the listed size, and (verify_hashes) of the
    listed sha256. Raises on the first mismatch with one line naming the file, the expected and the found value."""
    dtype = np.dtype(manifest["dtype"])
    for split in manifest["splits"].values():
        for shard in split["shards"]:
            path = Path(data_dir) / shard["file"]
            _check_size(path, shard, dtype)
            if verify_hashes and (found := file_sha256(path)) != shard["sha256"]:
                raise ValueError(
                    f"data shard {path} is damaged: sha256 {found}, its {MANIFEST} expects {shard['sha256']}; restore "
                    "it or re-run `python -m data_pipeline.prepare` into that directory"
                )


def changed_shards(before: dict, after: dict, split: str = "train") -> list[str]:
    """What differs between two manifests' shards of `split`, one entry per file (e.g. "train_00000.bin: 1,077,205
    -> 250,000 tokens"); empty when the shards are the same."""

    def shards(m: dict) -> dict[str, dict]:
        return {s["file"]: s for s in m.get("splits", {}).get(split, {}).get("shards", [])}

    old, new = shards(before), shards(after)
    out = []
    for name in sorted(old.keys() | new.keys()):
        a, b = old.get(name), new.get(name)
        if a is None:
            out.append(f"{name}: added ({b['tokens']:,} tokens)")
        elif b is None:
            out.append(f"{name}: removed (had {a['tokens']:,} tokens)")
        elif a["tokens"] != b["tokens"]:
            out.append(f"{name}: {a['tokens']:,} -> {b['tokens']:,} tokens")
        elif a["sha256"] != b["sha256"]:
            out.append(f"{name}: same {a['tokens']:,} tokens, other contents (sha256 {a['sha256'][:12]}… -> "
                       f"{b['sha256'][:12]}…)")  # fmt: skip
    return out


class TokenStream:
    """Read-only view over the concatenated shards of a split, memory-mapped (no copy into RAM)."""

    def __init__(self, data_dir: str | Path, shards: list[dict], dtype: str) -> None:
        shards = [s for s in shards if s["tokens"]]
        for s in shards:  # a damaged shard is named here, not by numpy's anonymous size error
            _check_size(Path(data_dir) / s["file"], s, np.dtype(dtype))
        self.maps = [np.memmap(Path(data_dir) / s["file"], dtype=np.dtype(dtype), mode="r") for s in shards]
        self.offsets = np.cumsum([0] + [len(m) for m in self.maps])

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def read(self, start: int, length: int) -> np.ndarray:
        """Tokens [start, start + length) as int64, crossing shard boundaries when needed."""
        out = np.empty(length, dtype=np.int64)
        filled = 0
        i = int(np.searchsorted(self.offsets, start, side="right")) - 1
        while filled < length:
            local = start + filled - int(self.offsets[i])
            take = min(length - filled, len(self.maps[i]) - local)
            out[filled : filled + take] = self.maps[i][local : local + take]
            filled += take
            i += 1
        return out
