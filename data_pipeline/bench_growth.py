"""`python -m data_pipeline.bench_growth tokenizer.path=TOK out=DIR [factors=1,4,16] [engines=local,ray] [workers=2]
[data=shared_ko] [sources=a,b]`: prepare's wall time and the peak RSS of its largest process as the corpus grows.

The corpus at factor F is F copies of every input file of the data config (copy 0 verbatim, the others with one word
of every document replaced at random, so exact and near duplicates scale with it), written once under
DIR/corpus_F/. Each run is a fresh `python -m data_pipeline.prepare` process; a sampler polls the RSS of it and all
its descendants (pool workers; Ray's raylet, GCS and workers) every 0.2 s. Prints one JSON line per run, with the
peak of each kind of process (`peaks`: driver, workers, raylet, gcs, other Ray processes) and, for the largest one,
what it was running at its peak (a Ray worker's title names its task: `ray::work_task`).
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import yaml

from data_pipeline.sources import resolve_files

REPO = Path(__file__).resolve().parents[1]
WORDS = ["그리고", "하지만", "또한", "the", "및", "따라서", "새로운", "변경", "다시", "이미"]


def _edit(text: str, rng: np.random.Generator) -> str:
    words = text.split(" ")
    if len(words) > 1:
        words[int(rng.integers(len(words)))] = WORDS[int(rng.integers(len(WORDS)))]
    return " ".join(words)


def make_corpus(data: dict, factor: int, out: Path, sources: list[str] | None) -> dict:
    """Write the F-times corpus (once) and return a data config dict pointing at it."""
    srcs = {k: v for k, v in data["sources"].items() if not sources or k in sources}
    done = out / "done"
    new = {}
    for name, src in srcs.items():
        from data_pipeline.config import SourceConfig

        files = resolve_files(name, SourceConfig(**{k: v for k, v in src.items()}))
        d = out / name
        d.mkdir(parents=True, exist_ok=True)
        paths = []
        for fi, path in enumerate(files):
            for c in range(factor):
                dst = d / f"{fi:03d}_{c:03d}{path.suffix}"
                paths.append(str(dst))
                if not done.exists():
                    _copy(path, dst, src, np.random.default_rng([fi, c]), edit=c > 0)
        new[name] = {**src, "paths": paths}
    done.touch()
    return {**data, "sources": new}


def _copy(src_path: Path, dst: Path, src: dict, rng, edit: bool) -> None:
    fmt, field = src.get("format", "json"), src.get("text", "text")
    if not edit:
        dst.write_bytes(src_path.read_bytes())
    elif fmt == "json":
        with open(src_path, encoding="utf-8") as fi, open(dst, "w", encoding="utf-8") as fo:
            for line in fi:
                row = json.loads(line)
                if isinstance(row.get(field), str):
                    row[field] = _edit(row[field], rng)
                fo.write(json.dumps(row, ensure_ascii=False) + "\n")
    elif fmt == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        table = pq.read_table(src_path)
        col = [_edit(t, rng) if isinstance(t, str) else t for t in table.column(field).to_pylist()]
        pq.write_table(table.set_column(table.schema.get_field_index(field), field, pa.array(col)), dst)
    elif fmt == "csv":
        with open(src_path, encoding="utf-8", newline="") as fi, open(dst, "w", encoding="utf-8", newline="") as fo:
            reader = csv.DictReader(fi)
            writer = csv.DictWriter(fo, reader.fieldnames)
            writer.writeheader()
            for row in reader:
                writer.writerow({k: _edit(v, rng) if isinstance(v, str) else v for k, v in row.items()})
    else:
        dst.write_text(_edit(src_path.read_text(encoding="utf-8"), rng), encoding="utf-8")


def measure(cmd: list[str], env: dict) -> dict:
    """Run cmd; wall seconds and the peak RSS (MB) of the largest process of its tree, and of the driver."""
    import psutil

    start = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak: dict[int, int] = {}
    names: dict[int, str] = {}  # the command line at the peak (a Ray worker's shows its current task)
    stop = threading.Event()

    def sample() -> None:
        root = psutil.Process(proc.pid)
        while not stop.is_set():
            try:
                for p in [root, *root.children(recursive=True)]:
                    try:
                        rss = p.memory_info().rss
                        if rss > peak.get(p.pid, 0):
                            peak[p.pid] = rss
                            names[p.pid] = " ".join(p.cmdline()[:3])
                    except psutil.Error:
                        pass
            except psutil.Error:
                pass
            time.sleep(0.2)

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    out, err = proc.communicate()
    stop.set()
    t.join()
    if proc.returncode:
        sys.exit(f"prepare failed:\n{err[-3000:]}")
    kinds: dict[str, int] = {}
    for pid, rss in peak.items():
        kind = "driver" if pid == proc.pid else _kind(names.get(pid, ""))
        kinds[kind] = max(kinds.get(kind, 0), rss)
    return {
        "seconds": round(time.perf_counter() - start, 1),
        "peak_rss_max_mb": round(max(peak.values()) / 1e6),
        "largest": names.get(max(peak, key=peak.get), "")[-60:],
        "peak_rss_driver_mb": round(peak.get(proc.pid, 0) / 1e6),
        "peaks": {k: round(v / 1e6) for k, v in sorted(kinds.items())},
        "processes": len(peak),
        "summary": json.loads(out.strip().splitlines()[-1]),
    }


def _kind(cmdline: str) -> str:
    """Which kind of process a command line is: a worker (pool or Ray), Ray's raylet or GCS, or another one."""
    if cmdline.startswith("ray::") and not cmdline.startswith(("ray::DashboardAgent", "ray::RuntimeEnvAgent")):
        return "workers"  # a Ray worker, titled by its task (ray::IDLE between tasks)
    if "default_worker.py" in cmdline or "multiprocessing" in cmdline or "data_pipeline.prepare" in cmdline:
        return "workers"
    executable = cmdline.split(" ")[0]
    for kind in ("raylet", "gcs_server"):
        if executable.endswith(f"/{kind}"):
            return kind.removesuffix("_server")
    return "other"


def main() -> None:
    args = dict(a.split("=", 1) for a in sys.argv[1:])
    out = Path(args["out"])
    data = yaml.safe_load((REPO / "configs" / "data" / f"{args.get('data', 'shared_ko')}.yaml").read_text())
    sources = args["sources"].split(",") if args.get("sources") else None
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "PYTHONPATH": str(REPO)}
    for factor in map(int, args.get("factors", "1,4,16").split(",")):
        cfg = make_corpus(data, factor, out / f"corpus_{factor}", sources)
        cfg["name"] = f"growth_{factor}"
        cfg_path = out / "data" / f"growth_{factor}.yaml"  # a `data` group entry under --config-dir
        cfg_path.parent.mkdir(parents=True, exist_ok=True)
        cfg_path.write_text(yaml.safe_dump(cfg, allow_unicode=True))
        in_mb = sum(os.path.getsize(p) for s in cfg["sources"].values() for p in s["paths"]) / 1e6
        for engine in args.get("engines", "local,ray").split(","):
            res = out / f"prepared_{factor}_{engine}"
            cmd = [sys.executable, "-m", "data_pipeline.prepare", f"--config-dir={out}", f"data={cfg_path.stem}"]
            cmd += [f"tokenizer.path={args['tokenizer.path']}", f"out={res}", f"data.engine={engine}"]
            cmd += [f"data.num_workers={args.get('workers', '2')}"]
            subprocess.run(["rm", "-rf", str(res)], check=True)
            row = {"factor": factor, "engine": engine, "input_mb": round(in_mb, 1), **measure(cmd, env)}
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
