"""`python -m data_pipeline.bench_reducer [records=524288,2097152]`: peak memory of one dedup reducer by its size.

For each size N: N random band records (5 bands of 11 rows, a tenth of them in groups) and N exact records, then
what near_task and exact_task do with them once loaded (eligible prefix, exact duplicates left out, sort, groups).
The peak is tracemalloc's (numpy's allocations, the loaded records included), in MB. Prints one JSON line per N.
"""

from __future__ import annotations

import json
import sys
import tracemalloc

import numpy as np

from data_pipeline.dedup import EXACT, band_dtype, band_groups, eligible, exact_duplicates

ROWS = 11
LIMITS = np.full(1 << 9, 1 << 40, np.int64)  # every ordinal eligible (no data.max_docs_per_source)


def band_peak(n: int, rng: np.random.Generator) -> int:
    tracemalloc.start()
    rec = np.zeros(n, band_dtype(ROWS))
    rec["band"] = rng.integers(0, 5, n)
    rec["v"] = rng.integers(0, 1 << 32, (n, ROWS))
    rec["ord"] = rng.integers(0, 1 << 40, n)
    rec["v"][: n // 10] = rec["v"][n // 10 : 2 * (n // 10)]
    exact = np.sort(rng.integers(0, 1 << 40, 1000).astype(np.uint64))
    rec = rec[eligible(rec["ord"], LIMITS)]
    rec = rec[~np.isin(rec["ord"], exact)]
    band_groups(rec, ROWS)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return peak


def exact_peak(n: int, rng: np.random.Generator) -> int:
    tracemalloc.start()
    rec = np.zeros(n, EXACT)
    rec["hi"] = rng.integers(0, 1 << 63, n)
    rec["lo"] = rec["hi"]
    rec["ord"] = rng.integers(0, 1 << 40, n)
    exact_duplicates(rec[eligible(rec["ord"], LIMITS)])
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return peak


def main() -> None:
    args = dict(a.split("=", 1) for a in sys.argv[1:])
    for n in map(int, args.get("records", "524288,2097152").split(",")):
        rng = np.random.default_rng(0)
        row = {"records": n, "band_input_mb": round(n * band_dtype(ROWS).itemsize / 1e6)}
        row["band_peak_mb"] = round(band_peak(n, rng) / 1e6)
        row["exact_input_mb"] = round(n * EXACT.itemsize / 1e6)
        row["exact_peak_mb"] = round(exact_peak(n, rng) / 1e6)
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
