"""`python -m data_pipeline.prepare data=NAME tokenizer.path=TOK out=OUT [data.engine=local|ray]`: sources ->
packed token shards + BOM.

Stages, each a set of independent tasks on the engine (`data.engine`: local processes or Ray tasks, engine.py):
(1) per input file (`work.py`): read as a stream, clean (NFC, control characters), apply the quality filters, scrub
PII, tokenize (each document followed by EOS), and write the dedup keys as bucketed sorted runs; (2) dedup
reducers per bucket range, then one small resolve step; (3) per file: the validation split (a hash of the
document's stable id under `data.val_fraction`), mixture weights and caps; (4) token shards, each its own task;
(5) `manifest.json`, last (`global_pass.py`). Every document is counted: docs_in == docs_kept + sum(rejected).
`manifest.json`'s presence marks a complete directory, and its bytes, like the shards', do not depend on the engine,
the number of workers, nodes or parts. Every task's output is written atomically and reused by a relaunch.

Split across machines without Ray: run `data.num_shards=N data.shard_index=i` for i in 0..N-1 (e.g. a SLURM array)
on the same OUT, then once more without data.shard_index (or `python -m data_pipeline.merge`): finished per-file
results are reused and only the later stages run.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import time
from dataclasses import asdict
from pathlib import Path

import hydra

from data_pipeline.cli import to_object_strict, user_errors
from data_pipeline.config import DataConfig, PrepareRoot
from data_pipeline.engine import make_engine
from data_pipeline.global_pass import NOT_IN_MANIFEST, Context, finish, is_validation
from data_pipeline.shards import MANIFEST, token_dtype
from data_pipeline.sources import check_licenses, input_stat, resolve_files
from data_pipeline.text_tokenizer import TextTokenizer, load_tokenizer
from data_pipeline.work import Task, fingerprint, process_file, result_is_current

__all__ = ["PrepareRoot", "is_validation", "make_tasks", "prepare"]


def make_tasks(data: DataConfig) -> list[Task]:
    """Every input file of every source, in (source, file) order; fails fast on a pattern matching nothing."""
    tasks = []
    for name, src in data.sources.items():
        for file_index, path in enumerate(resolve_files(name, src)):
            tasks.append(Task(len(tasks), name, file_index, str(path)))
    return tasks


def work_task(ctx: Context, task: Task) -> dict:
    """Phase 1 for one file (skipped when its result is current: a retried or relaunched task)."""
    fp = fingerprint(ctx.data, ctx.tok.sha256, task)
    if result_is_current(ctx.work, task, fp):
        return json.loads((ctx.work / f"{task.stem}.json").read_text())
    return process_file(task, ctx.data, ctx.tok, ctx.dtype, ctx.work, threads=1)


def _workers(data: DataConfig) -> int:
    return data.num_workers or os.cpu_count() or 1


def run_work(data: DataConfig, tok: TextTokenizer, tasks: list[Task], dtype, work: Path, log=print, engine=None) -> int:
    """Phase 1 for the given tasks, skipping results already current; returns how many files were processed."""
    todo = [t for t in tasks if not result_is_current(work, t, fingerprint(data, tok.sha256, t))]
    todo.sort(key=lambda t: -input_stat(t.path)[0])  # biggest first, so that a large file does not start last
    ctx = Context(data, tok, dtype.name, str(work.parent), "")
    own = engine is None
    engine = engine or make_engine(data.engine, data.ray_address, _workers(data))
    try:
        for meta in engine.map(work_task, todo, ctx, log=log, name="work"):
            log(f"[prepare] read {meta['task']['path']}: {meta['kept']}/{meta['docs_in']} pass the filters")
    finally:
        if own:
            engine.close()
    return len(todo)


def run_fingerprint(data: DataConfig, tok: TextTokenizer, tasks: list[Task]) -> str:
    """Hash of everything the stages after phase 1 depend on: their outputs are reused only for the same run."""
    parts = {
        "files": [fingerprint(data, tok.sha256, t) for t in tasks],
        "data": {k: v for k, v in asdict(data).items() if k not in NOT_IN_MANIFEST},
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def prepare(data: DataConfig, tok: TextTokenizer, tokenizer_path: str, out: str | Path, *, log=print) -> dict:
    """Run the pipeline and return the manifest; refuses bad licenses and missing paths before writing anything.

    With data.shard_index set, only that part's per-file work runs and a part summary is returned instead.
    """
    check_licenses(data)
    tasks = make_tasks(data)
    out = Path(out)
    work = out / "work"
    work.mkdir(parents=True, exist_ok=True)
    (out / MANIFEST).unlink(missing_ok=True)  # an old manifest must not vouch for new shards
    dtype = token_dtype(tok.vocab_size)
    start = time.time()
    engine = make_engine(data.engine, data.ray_address, _workers(data))
    try:
        if data.shard_index is not None:
            mine = [t for t in tasks if t.index % data.num_shards == data.shard_index]
            done = run_work(data, tok, mine, dtype, work, log, engine)
            return {"part": data.shard_index, "num_shards": data.num_shards, "files": len(mine), "processed": done}
        run_work(data, tok, tasks, dtype, work, log, engine)
        stage = work / f"stage-{run_fingerprint(data, tok, tasks)}"
        for old in work.glob("stage-*"):  # an earlier run's decisions (other config or inputs) are not reused
            if old != stage:
                shutil.rmtree(old, ignore_errors=True)
        stage.mkdir(exist_ok=True)
        metas = [json.loads((work / f"{t.stem}.json").read_text()) for t in tasks]
        tok_info = {"path": str(tokenizer_path), "sha256": tok.sha256, "vocab_size": tok.vocab_size}
        tok_info["eos_id"] = tok.eos_id
        ctx = Context(data, None, dtype.name, str(out), str(stage))
        manifest = finish(ctx, engine, tasks, metas, tok_info, log=log)
    finally:
        engine.close()
    log(f"[prepare] done in {time.time() - start:.1f}s")
    return manifest


def run_cli(cfg) -> None:
    """Shared by `prepare` and `merge`: parse, check, run, print a one-line JSON summary."""
    with user_errors():
        root: PrepareRoot = to_object_strict(cfg)
        if root.out == "???" or not root.out:
            raise ValueError("set out=DIR: where to write the token shards and manifest.json")
        tok = load_tokenizer(root.tokenizer)
        start = time.time()
        result = prepare(root.data, tok, root.tokenizer.path, root.out, log=lambda m: print(m, file=sys.stderr))
    seconds = round(time.time() - start, 2)
    if "splits" not in result:
        print(json.dumps({"out": root.out, **result, "seconds": seconds}))
        return
    splits = {k: v["tokens"] for k, v in result["splits"].items()}
    print(json.dumps({"out": root.out, "tokens": splits, "seconds": seconds}))


@hydra.main(config_path="../configs", config_name="prepare", version_base="1.3")
def main(cfg) -> None:
    run_cli(cfg)


if __name__ == "__main__":
    main()
