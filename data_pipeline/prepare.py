"""`python -m data_pipeline.prepare data=NAME tokenizer.path=TOK out=OUT`: sources -> packed token shards + BOM.

Two phases. (1) Per input file, in parallel processes (`data.num_workers`): read as a stream, clean (NFC, control
characters), apply the quality filters, scrub PII, compute dedup hashes and MinHash signatures, tokenize (each
document followed by EOS); results go to OUT/work/ (`work.py`). (2) One global pass in (source, file, row) order:
exact and near-duplicate removal across everything, the validation split (a hash of the document's stable id under
`data.val_fraction`), mixture weights and caps, token shards and `manifest.json` (`global_pass.py`). Every document is
counted: docs_in == docs_kept + sum(rejected). `manifest.json` is written last: its presence marks a complete
directory, and its bytes, like the shards', do not depend on the number of workers or parts.

Split across machines: run `data.num_shards=N data.shard_index=i` for i in 0..N-1 (e.g. a SLURM array) on the same
OUT, then once more without data.shard_index (or `python -m data_pipeline.merge`): finished per-file results are
reused and only the global pass runs.
"""

from __future__ import annotations

import contextlib
import json
import multiprocessing
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import hydra

from data_pipeline.cli import to_object_strict, user_errors
from data_pipeline.config import DataConfig, PrepareRoot
from data_pipeline.global_pass import is_validation, merge
from data_pipeline.shards import MANIFEST, token_dtype
from data_pipeline.sources import check_licenses, resolve_files
from data_pipeline.text_tokenizer import TextTokenizer, load_tokenizer
from data_pipeline.work import Task, fingerprint, init_worker, process_file, result_is_current, run_task

__all__ = ["PrepareRoot", "is_validation", "make_tasks", "prepare"]


def make_tasks(data: DataConfig) -> list[Task]:
    """Every input file of every source, in (source, file) order; fails fast on a pattern matching nothing."""
    tasks = []
    for name, src in data.sources.items():
        for file_index, path in enumerate(resolve_files(name, src)):
            tasks.append(Task(len(tasks), name, file_index, str(path)))
    return tasks


def _pending(data: DataConfig, tok: TextTokenizer, tasks: list[Task], work: Path) -> list[Task]:
    """Tasks without a current result, biggest files first (so that a large file does not start last)."""
    todo = [t for t in tasks if not result_is_current(work, t, fingerprint(data, tok.sha256, t))]
    return sorted(todo, key=lambda t: -os.path.getsize(t.path))


@contextlib.contextmanager
def work_pool(data: DataConfig, tok: TextTokenizer, todo: list[Task], dtype, work: Path, log=print):
    """Start phase 1 for `todo`; yields wait(task), which returns once that task's result is written."""
    workers = min(data.num_workers or os.cpu_count() or 1, max(1, len(todo)))
    pending = {t.index for t in todo}
    if workers <= 1:

        def run_inline(task: Task) -> None:
            if task.index in pending:
                process_file(task, data, tok, dtype.name, work, threads=0)
                pending.discard(task.index)

        yield run_inline
        return
    ctx = multiprocessing.get_context("fork" if sys.platform == "linux" else "spawn")
    args = (data, tok, dtype.name, work, 1)
    with ProcessPoolExecutor(workers, mp_context=ctx, initializer=init_worker, initargs=args) as pool:
        futures = {t.index: pool.submit(run_task, t) for t in todo}

        def wait(task: Task) -> None:
            if task.index in futures:
                meta = futures.pop(task.index).result()
                log(f"[prepare] read {meta['task']['path']}: {meta['kept']}/{meta['docs_in']} pass the filters")

        try:
            yield wait
        except BaseException:
            for f in futures.values():
                f.cancel()
            raise


def run_work(data: DataConfig, tok: TextTokenizer, tasks: list[Task], dtype, work: Path, log=print) -> int:
    """Phase 1 for the given tasks, skipping results already current; returns how many files were processed."""
    todo = _pending(data, tok, tasks, work)
    with work_pool(data, tok, todo, dtype, work, log) as wait:
        for t in todo:
            wait(t)
    return len(todo)


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
    if data.shard_index is not None:
        mine = [t for t in tasks if t.index % data.num_shards == data.shard_index]
        done = run_work(data, tok, mine, dtype, work, log)
        return {"part": data.shard_index, "num_shards": data.num_shards, "files": len(mine), "processed": done}
    for old in list(out.glob("*.bin")):  # shards of an earlier run with more files must not linger
        old.unlink()
    tok_info = {"path": str(tokenizer_path), "sha256": tok.sha256, "vocab_size": tok.vocab_size, "eos_id": tok.eos_id}
    # The global pass consumes results in (source, file) order while the pool still works on later files.
    with work_pool(data, tok, _pending(data, tok, tasks, work), dtype, work, log) as wait:
        manifest = merge(data, tasks, tok_info, dtype, out, log=log, ready=wait)
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
