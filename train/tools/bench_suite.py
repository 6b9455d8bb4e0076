"""Benchmark suites: every variant of a suite file in its own `python -m train.bench` subprocess (clean peak memory
and compile caches; an out-of-memory variant is recorded as OOM and the rest still run), then one Markdown table.

    python -m train.bench bench.suite=configs/bench_suite/h100_dense.yaml bench.table_out=BENCHMARKS.md

A suite file holds `common` (Hydra overrides for every variant) and `variants` (each a `name` and its
`overrides`); a variant with `bench.impl=transformers` is the peer the others' speedup is computed against.
"""

from __future__ import annotations

import datetime
import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from omegaconf import OmegaConf


def markers(suite: str) -> tuple[str, str]:
    """The comment pair around a suite's table, keyed by the suite file's name (several suites, one file)."""
    name = Path(suite).stem
    return f"<!-- bench-suite:{name}:start -->", f"<!-- bench-suite:{name}:end -->"


OOM_MARKERS = ("OutOfMemoryError", "out of memory", "CUDA error: out of memory")
# Keys the parent sets for its children; a child never recurses into a suite or a search.
CHILD_FIXED = ("bench.suite=null", "bench.table_out=null", "bench.find_max_micro_batch=false", "bench.peer=false")


def overrides_from_argv() -> list[str]:
    """This process's Hydra overrides (the command line), for re-running the same benchmark in a child."""
    return [a for a in sys.argv[1:] if not a.startswith(("hydra.", "--"))]


def _without(overrides: list[str], *keys: str) -> list[str]:
    return [o for o in overrides if o.split("=", 1)[0].lstrip("+~") not in keys]


def run_child(overrides: list[str], timeout_s: int) -> dict:
    """One `python -m train.bench` subprocess; its summary, or {"status": "OOM" | "timeout" | "error", ...}."""
    cmd = [sys.executable, "-m", "train.bench", *overrides, *CHILD_FIXED]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return {"status": "timeout", "error": f"killed after {timeout_s} s"}
    out = proc.stdout + proc.stderr
    if proc.returncode == 0:
        lines = proc.stdout.strip().splitlines()
        if lines:
            try:
                return dict(json.loads(lines[-1]), status="ok")
            except json.JSONDecodeError:
                pass
    if any(m in out for m in OOM_MARKERS):
        return {"status": "OOM", "error": "out of memory"}
    tail = [line for line in out.strip().splitlines() if line.strip()][-1:] or ["no output"]
    return {"status": "error", "error": f"exit {proc.returncode}: {tail[0][:300]}"}


def search_max(start: int, cap: int, fits: Callable[[int], bool]) -> tuple[int, bool]:
    """Largest n <= cap with fits(n) (assumed monotone): double from start until a failure, then bisect between
    the last fit and the first failure (searching below start when start fails). Returns (n or 0, capped)."""
    lo, hi = 0, None  # lo fits (0 = none yet); hi fails
    n = start
    while n <= cap:
        if not fits(n):
            hi = n
            break
        lo, n = n, n * 2
    if hi is None:
        return lo, True
    if lo == 0:  # even the starting size fails: halve until something fits
        n = hi // 2
        while n >= 1 and not fits(n):
            hi, n = n, n // 2
        if n < 1:
            return 0, False
        lo = n
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo, False


def find_max_micro_batch(overrides: list[str], bc) -> dict:
    """Largest micro-batch that trains (1 warmup + 1 timed step) without running out of memory, one subprocess per
    try; `capped` when bench.max_micro_batch still fitted."""
    base = _without(overrides, "bench.micro_batch_size", "bench.steps", "bench.warmup", "bench.find_max_micro_batch")
    tries: dict[int, str] = {}

    def fits(mb: int) -> bool:
        r = run_child([*base, f"bench.micro_batch_size={mb}", "bench.steps=1", "bench.warmup=1"], bc.variant_timeout_s)
        tries[mb] = r["status"]
        print(json.dumps({"micro_batch_size": mb, "status": r["status"], "error": r.get("error")}), flush=True)
        return r["status"] == "ok"

    best, capped = search_max(bc.micro_batch_size, bc.max_micro_batch, fits)
    return {"max_micro_batch_size": best, "capped": capped, "tries": tries}


def load_suite(path: str) -> tuple[list[str], list[dict]]:
    if not Path(path).is_file():
        raise FileNotFoundError(f"bench.suite={path}: no such file (see configs/bench_suite/h100_dense.yaml)")
    suite = OmegaConf.to_container(OmegaConf.load(path))
    variants = suite.get("variants") or []
    if not variants or any(not isinstance(v, dict) or "name" not in v for v in variants):
        raise ValueError(f"bench.suite={path}: needs `variants:`, a list of {{name, overrides}}")
    return list(suite.get("common") or []), variants


def _fmt(x, spec: str) -> str:
    return "" if x is None else format(x, spec)


def speedups(rows: list[dict]) -> None:
    """Each of our rows gets tokens/s over the peer of the same model and sequence length (same micro-batch when
    a peer row has it)."""
    peers = [r for r in rows if r.get("status") == "ok" and r.get("impl") == "transformers"]
    for r in rows:
        if r.get("status") != "ok" or r.get("impl") != "hangang":
            continue
        same = [p for p in peers if (p["model"], p["seq_len"]) == (r["model"], r["seq_len"])]
        best = [p for p in same if p["micro_batch_size"] == r["micro_batch_size"]] or same
        if best:
            r["speedup"] = round(r["tokens_per_s"] / best[0]["tokens_per_s"], 3)


def markdown(rows: list[dict], command: str) -> str:
    ok = [r for r in rows if r.get("status") == "ok"]
    device = ", ".join(sorted({r["device"] for r in ok})) or "unknown (no variant ran)"
    torch_v = ", ".join(sorted({r.get("torch", "?") for r in ok}))
    lines = [
        f"Device: {device}; torch {torch_v}; {datetime.date.today().isoformat()}. Command:",
        "",
        "```bash",
        command,
        "```",
        "",
        "| variant | model | impl | compile | AC | loss | kernels | fp8 | seq | micro-batch | tokens/s | MFU "
        "| peak mem (GB) | speedup vs peer | max micro-batch | status |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        ours = r.get("impl") == "hangang"
        flags = [
            str(r.get(k, "")).lower() if ours else ""
            for k in ("compile", "activation_checkpointing", "loss_impl", "kernels", "fp8")
        ]
        lines.append(
            "| "
            + " | ".join(
                [
                    r["variant"],
                    r.get("model", ""),
                    r.get("impl", ""),
                    *flags,
                    str(r.get("seq_len", "")),
                    str(r.get("micro_batch_size", "")),
                    _fmt(r.get("tokens_per_s"), ",.0f"),
                    _fmt(r.get("mfu") and 100 * r["mfu"], ".1f") + ("%" if r.get("mfu") else ""),
                    _fmt(r.get("peak_mem_gb"), ".2f"),
                    _fmt(r.get("speedup"), ".2f") + ("x" if r.get("speedup") else ""),
                    str(r.get("max_micro_batch_size", "")),
                    r["status"] if r["status"] == "ok" else f"{r['status']}: {r.get('error', '')}".replace("|", "/"),
                ]
            )
            + " |"
        )
    return "\n".join(lines) + "\n"


def write_table(path: str, table: str, suite: str) -> None:
    """Replace the text between the suite's markers in `path` (appending a marked section when absent)."""
    start, end = markers(suite)
    p = Path(path)
    block = f"{start}\n{table}{end}"
    text = p.read_text() if p.exists() else ""
    if start in text and end in text and text.index(start) < text.index(end):
        head, rest = text.split(start, 1)
        text = head + block + rest.split(end, 1)[1]
    else:
        text = (text.rstrip("\n") + "\n\n" if text else "") + block + "\n"
    p.write_text(text)


def run_suite(bc) -> list[dict]:
    """Run every variant of bench.suite; print each result as a JSON line, then the table. bench.table_out is
    rewritten after every variant, so a suite cut short still leaves the rows it finished."""
    common, variants = load_suite(bc.suite)
    command = "python -m train.bench " + " ".join(sys.argv[1:])
    rows = []
    for v in variants:
        overrides = [*common, *(v.get("overrides") or [])]
        r = run_child(overrides, bc.variant_timeout_s)
        r["variant"] = v["name"]
        if bc.find_max_micro_batch and r["status"] == "ok":
            r["max_micro_batch_size"] = find_max_micro_batch(overrides, bc)["max_micro_batch_size"]
        print(json.dumps(r), flush=True)
        rows.append(r)
        speedups(rows)
        if bc.table_out:
            write_table(bc.table_out, markdown(rows, command), bc.suite)
    print(markdown(rows, command), flush=True)
    return rows
