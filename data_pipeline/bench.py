"""`python -m data_pipeline.bench data=NAME tokenizer.path=TOK out=DIR`: the full prepare path against a baseline.

Baseline: `datasets.load_dataset` + `Dataset.map(batched=True, num_proc=N)` with the same tokenizer, no cleaning,
filters, PII or dedup (what a plain Hugging Face pipeline does). Each trial runs in a fresh process, baseline and
full path interleaved (`rounds` times) so that load from other jobs on a shared machine hits both alike. Prints one
JSON line per trial and a summary: input MB/s, tokens/s, peak RSS (main process, and the largest worker).
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

from hydra import compose, initialize_config_dir

from data_pipeline.cli import to_object_strict
from data_pipeline.prepare import prepare
from data_pipeline.sources import NOT_STRING, _render, _template_fields, resolve_files
from data_pipeline.text_tokenizer import load_tokenizer

_BUILDERS = {"json": "json", "parquet": "parquet", "csv": "csv", "text": "text"}


def baseline(data, tok, out: Path, num_proc: int) -> int:
    """Tokenize every source with datasets.map; returns the number of tokens (EOS included)."""
    import datasets  # here: the full path's trial process never loads it, so its time and RSS exclude it

    datasets.disable_progress_bars()
    total = 0
    for name, src in data.sources.items():
        files = [str(p) for p in resolve_files(name, src)]
        kwargs = {"sample_by": "document"} if src.format == "text" else {}
        ds = datasets.load_dataset(
            _BUILDERS[src.format], data_files=files, split="train", cache_dir=str(out / "cache"), **kwargs
        )
        template = src.text if "{" in src.text else "{" + src.text + "}"
        fields = _template_fields(template)

        def encode(batch, fields=fields, template=template):
            rows = [dict(zip(batch, values, strict=True)) for values in zip(*batch.values(), strict=True)]
            texts = [_render(template, fields, r) or "" for r in rows]
            texts = [t if t is not NOT_STRING else "" for t in texts]
            return {"ids": [ids + [tok.eos_id] for ids in tok.encode_batch(texts, num_threads=1)]}

        mapped = ds.map(encode, batched=True, batch_size=1000, num_proc=num_proc, remove_columns=ds.column_names)
        total += sum(len(x) for x in mapped["ids"])
    return total


def trial(kind: str, overrides: list[str]) -> dict:
    """One measured run in this (fresh) process."""
    with initialize_config_dir(str(Path(__file__).resolve().parents[1] / "configs"), version_base="1.3"):
        root = to_object_strict(compose("prepare", overrides))
    tok = load_tokenizer(root.tokenizer)
    out = Path(root.out) / kind
    shutil.rmtree(out, ignore_errors=True)  # no datasets cache, no reused per-file results: every trial is cold
    in_bytes = sum(os.path.getsize(p) for s in root.data.sources.values() for p in _files(s, root.data))
    start = time.perf_counter()
    if kind == "baseline":
        tokens = baseline(root.data, tok, out, root.data.num_workers or os.cpu_count() or 1)
    else:
        m = prepare(root.data, tok, root.tokenizer.path, out, log=lambda _: None)
        tokens = m["splits"]["train"]["tokens"] + m["splits"]["val"]["tokens"]
    seconds = time.perf_counter() - start
    kib = 1024 if sys.platform != "darwin" else 1
    return {
        "kind": kind,
        "seconds": round(seconds, 2),
        "input_mb": round(in_bytes / 1e6, 1),
        "mb_per_s": round(in_bytes / 1e6 / seconds, 2),
        "tokens": tokens,
        "tokens_per_s": round(tokens / seconds),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * kib / 1e6),
        "peak_worker_rss_mb": round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * kib / 1e6),
    }


def _files(src, data):
    return resolve_files("?", src)


USAGE = """python -m data_pipeline.bench data=NAME tokenizer.path=TOK out=DIR [rounds=N] [prepare overrides]

Throughput of the full prepare path (data_pipeline.bench) against a plain Hugging Face baseline
(datasets.load_dataset + Dataset.map with the same tokenizer, no cleaning, filters, PII or dedup). Each trial runs
in a fresh process, baseline and full path interleaved `rounds` times (default 2). Prints one JSON line per trial
(input MB/s, tokens/s, peak RSS) and the best of each kind.

Main keys: data=NAME, tokenizer.path, out (scratch directory), rounds, data.num_workers, and any
data_pipeline.prepare key.

Example:
  python -m data_pipeline.bench data=ko_sample tokenizer.path=runs/ko_tiny/tokenizer out=/tmp/bench rounds=3"""


def main() -> None:
    args = sys.argv[1:]
    if {"-h", "--help"} & set(args):
        print(USAGE)
        return
    if args and args[0] in ("--trial-baseline", "--trial-full"):
        print(json.dumps(trial(args[0].removeprefix("--trial-"), args[1:])))
        return
    rounds = 2
    for a in list(args):
        if a.startswith("rounds="):
            rounds = int(a.split("=", 1)[1])
            args.remove(a)
    results = []
    for r in range(rounds):
        for kind in ("baseline", "full"):
            cmd = [sys.executable, "-m", "data_pipeline.bench", f"--trial-{kind}", *args]
            proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
            if proc.returncode:
                sys.exit(f"{kind} trial failed:\n{proc.stderr[-3000:]}")
            row = {"round": r, **json.loads(proc.stdout.strip().splitlines()[-1])}
            print(json.dumps(row), flush=True)
            results.append(row)
    for kind in ("baseline", "full"):
        best = min((x for x in results if x["kind"] == kind), key=lambda x: x["seconds"])
        print(json.dumps({"best": kind, **best}))


if __name__ == "__main__":
    main()
