"""`python -m data_pipeline.prepare data=NAME tokenizer.path=TOK out=OUT`: sources -> packed token shards + BOM.

Documents are NFC-normalized and tokenized, each followed by EOS, and written as one flat token stream per split
(train, and validation per source); the trainer cuts the stream into fixed-length sequences. A document goes to
validation when a hash of its stable id falls under `data.val_fraction`, so the split does not depend on order.
`manifest.json` is written last and names every input file and shard with its sha256: its presence marks a
complete directory.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import hydra
from hydra.core.config_store import ConfigStore

from data_pipeline.cli import to_object_strict, user_errors
from data_pipeline.config import DataConfig
from data_pipeline.shards import FORMAT, MANIFEST, ShardWriter, token_dtype
from data_pipeline.sources import check_licenses, iter_source, resolve_files
from tokenizer.config import TokenizerConfig
from tokenizer.tokenizer import Tokenizer, file_sha256

ENCODE_BATCH = 512


@dataclass
class PrepareRoot:
    """Root config of `python -m data_pipeline.prepare`."""

    data: DataConfig = field(default_factory=DataConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    out: str = "???"


ConfigStore.instance().store(name="prepare_schema", node=PrepareRoot)


def is_validation(doc_id: str, val_fraction: float, seed: int) -> bool:
    """Deterministic held-out choice from the document's stable id."""
    digest = hashlib.blake2b(f"{seed}:{doc_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2**64 < val_fraction


def _write_batch(batch: list, tok: Tokenizer, data: DataConfig, train: ShardWriter, val: ShardWriter, stats: dict):
    """Tokenize a batch of documents (multi-threaded), append EOS to each, and route it to train or validation."""
    ids = tok.encode_batch([d.text for d in batch])
    for doc, doc_ids in zip(batch, ids, strict=True):
        doc_ids.append(tok.eos_id)
        held_out = is_validation(doc.doc_id, data.val_fraction, data.seed)
        (val if held_out else train).write(doc_ids)
        stats["tokens"] += len(doc_ids)
        stats["val_tokens" if held_out else "train_tokens"] += len(doc_ids)
    batch.clear()


def prepare(data: DataConfig, tok: Tokenizer, tokenizer_path: str, out: str | Path, *, log=print) -> dict:
    """Run the pipeline and return the manifest; refuses bad licenses and missing paths before writing anything."""
    check_licenses(data)
    files = {name: resolve_files(name, src) for name, src in data.sources.items()}
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / MANIFEST).unlink(missing_ok=True)  # an old manifest must not vouch for new shards
    dtype = token_dtype(tok.vocab_size)
    train = ShardWriter(out, "train", dtype, data.shard_tokens)
    sources: dict[str, dict] = {}
    val_shards: list[dict] = []
    start = time.time()
    for name, src in data.sources.items():
        val = ShardWriter(out, f"val_{name}", dtype, data.shard_tokens)
        stats = {"docs_in": 0, "docs_kept": 0, "rejected": Counter(), "tokens": 0, "train_tokens": 0, "val_tokens": 0}
        batch: list = []

        for doc in iter_source(name, src, data.max_docs_per_source):
            stats["docs_in"] += 1
            if doc is None:
                stats["rejected"]["missing_text"] += 1
            elif not doc.text.strip():
                stats["rejected"]["empty"] += 1
            else:
                stats["docs_kept"] += 1
                batch.append(doc)
                if len(batch) >= ENCODE_BATCH:
                    _write_batch(batch, tok, data, train, val, stats)
        _write_batch(batch, tok, data, train, val, stats)
        for shard in val.close():
            val_shards.append({**shard, "source": name})
        sources[name] = {
            "license": src.license,
            "attribution": src.attribution,
            "language": src.language,
            "weight": src.weight,
            "files": [{"path": str(p), "bytes": p.stat().st_size, "sha256": file_sha256(p)} for p in files[name]],
            **stats,
            "rejected": dict(stats["rejected"]),
        }
        log(f"[prepare] {name}: {stats['docs_kept']}/{stats['docs_in']} docs, {stats['tokens']:,} tokens")
    train_shards = train.close()
    manifest = {
        "format": FORMAT,
        "dtype": dtype.name,
        "vocab_size": tok.vocab_size,
        "eos_id": tok.eos_id,
        "tokenizer": {"path": str(tokenizer_path), "sha256": tok.sha256},
        "splits": {
            "train": {"shards": train_shards, "tokens": sum(s["tokens"] for s in train_shards)},
            "val": {"shards": val_shards, "tokens": sum(s["tokens"] for s in val_shards)},
        },
        "sources": sources,
        "config": asdict(data),
        "seconds": round(time.time() - start, 2),
    }
    tmp = out / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=2, ensure_ascii=False))
    os.replace(tmp, out / MANIFEST)
    return manifest


@hydra.main(config_path="../configs", config_name="prepare", version_base="1.3")
def main(cfg) -> None:
    with user_errors():
        root: PrepareRoot = to_object_strict(cfg)
        if root.out == "???" or not root.out:
            raise ValueError("set out=DIR: where to write the token shards and manifest.json")
        if not root.tokenizer.path:
            raise ValueError("set tokenizer.path=DIR: a tokenizer trained by `python -m tokenizer.train`")
        tok = Tokenizer.from_dir(root.tokenizer.path)
        manifest = prepare(root.data, tok, root.tokenizer.path, root.out, log=lambda m: print(m, file=sys.stderr))
    splits = {k: v["tokens"] for k, v in manifest["splits"].items()}
    print(json.dumps({"out": root.out, "tokens": splits, "seconds": manifest["seconds"]}))


if __name__ == "__main__":
    main()
