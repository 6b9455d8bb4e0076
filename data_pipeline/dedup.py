"""Deduplication: exact (hash of whitespace- and case-normalized text) and near-duplicate (MinHash LSH).

Signatures are computed in the per-file workers with numpy: character shingles hashed by a polynomial rolling
hash, then 32-bit multiply-add permutations (several times faster in numpy than datasketch's 64-bit modular ones).
The LSH index bands each signature as datasketch's `MinHashLSH` does (same band count and width, chosen by the same
false-positive/false-negative criterion; a document is a near duplicate when any band equals an earlier one's), but
as plain dicts of band bytes: the same decisions without importing datasketch and scipy (1.1 s) or wrapping each
signature (measured in BENCHMARKS.md). It is filled in one global pass in a fixed order (source, file, row), so the
first occurrence is kept whatever the number of workers or parts.
"""

from __future__ import annotations

import functools
import hashlib

import numpy as np

from data_pipeline.config import DedupConfig

_CHUNK = 1 << 15  # shingles per block: bounds the (num_perm x block) temporary


def exact_key(text: str) -> bytes:
    """16-byte hash of the text with whitespace collapsed and case folded."""
    return hashlib.blake2b(" ".join(text.split()).casefold().encode(), digest_size=16).digest()


def permutations(num_perm: int, seed: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Seeded (a, b) of the hashes (a * x + b) mod 2^32 (a odd: each is a permutation of 32-bit values)."""
    gen = np.random.RandomState(seed)
    a = gen.randint(0, 1 << 31, dtype=np.uint32, size=num_perm) * np.uint32(2) + np.uint32(1)
    b = gen.randint(0, 1 << 32, dtype=np.uint64, size=num_perm).astype(np.uint32)
    return a, b


def shingle_hashes(text: str, k: int) -> np.ndarray:
    """32-bit hashes of all character k-grams (whitespace collapsed), as uint32."""
    text = " ".join(text.split())
    codes = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32).astype(np.uint64)
    if len(codes) < k:
        codes = np.pad(codes, (0, k - len(codes)))
    h = np.zeros(len(codes) - k + 1, dtype=np.uint64)
    mult = np.uint64(0x100000001B3)
    for i in range(k):  # FNV-style polynomial over the window; uint64 wraps by design
        h = (h * mult) ^ codes[i : len(codes) - k + 1 + i]
    return ((h * np.uint64(0x9E3779B97F4A7C15)) >> np.uint64(32)).astype(np.uint32)


def signature(text: str, cfg: DedupConfig, perms: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    """MinHash signature (num_perm values < 2^32, as uint64 for datasketch) of the text's character shingles."""
    a, b = perms
    # Repeated shingles need no np.unique: they cannot change a minimum. 32-bit lanes: twice the numpy throughput.
    hv = shingle_hashes(text, cfg.shingle)
    sig = np.full(cfg.num_perm, np.iinfo(np.uint32).max, dtype=np.uint32)
    with np.errstate(over="ignore"):
        for i in range(0, len(hv), _CHUNK):
            block = hv[i : i + _CHUNK]
            phv = block[None, :] * a[:, None] + b[:, None]
            np.minimum(sig, phv.min(axis=1), out=sig)
    return sig.astype(np.uint64)


@functools.cache  # ~30 ms a call, made once per file and per reducer
def lsh_params(threshold: float, num_perm: int) -> tuple[int, int]:
    """(bands, rows per band) minimizing the mean of the false-positive and false-negative probabilities at
    `threshold`: datasketch's `_optimal_param` with equal weights, integrated with numpy instead of scipy."""
    best, opt = float("inf"), (0, 0)
    lo, hi = np.linspace(0.0, threshold, 2001), np.linspace(threshold, 1.0, 2001)
    for b in range(1, num_perm + 1):
        for r in range(1, num_perm // b + 1):
            fp = np.trapezoid(1 - (1 - lo**r) ** b, lo)
            fn = np.trapezoid((1 - hi**r) ** b, hi)
            err = 0.5 * fp + 0.5 * fn
            if err < best:
                best, opt = err, (b, r)
    return opt


class Deduplicator:
    """Global first-occurrence-wins dedup; feed documents in a fixed order."""

    def __init__(self, cfg: DedupConfig) -> None:
        self.cfg = cfg
        self.exact: set[bytes] = set()
        self.bands: list[set[bytes]] = []
        if cfg.near:
            b, self.rows = lsh_params(cfg.threshold, cfg.num_perm)
            self.bands = [set() for _ in range(b)]

    def check(self, key: bytes, sig: np.ndarray | None) -> str | None:
        """'exact_duplicate' / 'near_duplicate' when an earlier document matches, else None (and remember it)."""
        if self.cfg.exact:
            if key in self.exact:
                return "exact_duplicate"
            self.exact.add(key)
        if self.bands and sig is not None:
            r = self.rows
            keys = [sig[i * r : (i + 1) * r].tobytes() for i in range(len(self.bands))]
            if any(k in band for k, band in zip(keys, self.bands, strict=True)):
                return "near_duplicate"
            for k, band in zip(keys, self.bands, strict=True):
                band.add(k)
        return None


# ---- Dedup in bounded memory: bucketed sorted runs on disk, duplicates per bucket, keep/drop from the pairs ----
#
# Every kept document of phase 1 has an ordinal `task_index << 32 | k` (k: its position among its file's kept
# documents), so ordinal order is (source, file, row) order. Each file writes two runs, sorted by bucket: its exact
# keys and its LSH band keys (full band values: no hash decides equality). Reducers each take a range of buckets from
# every run, sort it, and report the exact duplicates (every occurrence of a key after the first) and the band
# groups of two or more documents. `resolve` then replays today's sequential rule from those groups alone: a
# document is a near duplicate when it shares a band with an earlier document that was kept, and exact duplicates
# take no part. Memory: one bucket range per reducer, and the duplicates (exact ones, and band-group members).

BUCKETS = 1024
"""Fine buckets per run; a reducer takes a contiguous range of them (how many depends on the corpus size)."""
EXACT = np.dtype([("hi", "<u8"), ("lo", "<u8"), ("ord", "<u8")])


def band_dtype(rows: int) -> np.dtype:
    return np.dtype([("band", "<u4"), ("v", "<u4", (rows,)), ("ord", "<u8")])


def _bucket(h: np.ndarray) -> np.ndarray:
    return (h >> np.uint64(54)).astype(np.int64)  # top 10 bits of a well-mixed 64-bit hash: BUCKETS = 1024


def _mix(h: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        h = (h ^ (h >> np.uint64(33))) * np.uint64(0xFF51AFD7ED558CCD)
        return h ^ (h >> np.uint64(33))


def _sorted_run(records: np.ndarray, bucket: np.ndarray, order_keys: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Records sorted by (bucket, keys...), and the offsets of each bucket (BUCKETS + 1 entries)."""
    order = np.lexsort([*reversed(order_keys), bucket]) if len(records) else np.zeros(0, np.int64)
    offsets = np.searchsorted(bucket[order], np.arange(BUCKETS + 1), side="left").astype(np.int64)
    return records[order], offsets


def exact_run(keys: np.ndarray, ordinals: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(n, 16) uint8 exact keys -> a sorted run of (hi, lo, ordinal) records and its bucket offsets."""
    k = np.ascontiguousarray(keys).view("<u8").reshape(-1, 2) if len(keys) else np.zeros((0, 2), "<u8")
    rec = np.zeros(len(k), EXACT)
    rec["hi"], rec["lo"], rec["ord"] = k[:, 0], k[:, 1], ordinals
    return _sorted_run(rec, _bucket(rec["hi"]), [rec["hi"], rec["lo"], rec["ord"]])


def band_run(sigs: np.ndarray, ordinals: np.ndarray, bands: int, rows: int) -> tuple[np.ndarray, np.ndarray]:
    """(n, num_perm) signatures -> a sorted run of (band, values, ordinal) records (n * bands) and offsets."""
    n = len(sigs)
    rec = np.zeros(n * bands, band_dtype(rows))
    vals = sigs[:, : bands * rows].astype("<u4").reshape(n, bands, rows)
    rec["band"] = np.tile(np.arange(bands, dtype="<u4"), n)
    rec["v"] = vals.reshape(n * bands, rows)
    rec["ord"] = np.repeat(ordinals.astype("<u8"), bands)
    h = rec["band"].astype(np.uint64)
    with np.errstate(over="ignore"):
        for j in range(rows):
            h = h * np.uint64(0x100000001B3) ^ rec["v"][:, j].astype(np.uint64)
    keys = [rec["band"]] + [rec["v"][:, j] for j in range(rows)] + [rec["ord"]]
    return _sorted_run(rec, _bucket(_mix(h)), keys)


def read_range(run: np.ndarray, offsets: np.ndarray, lo: int, hi: int) -> np.ndarray:
    """Records of buckets [lo, hi) of a run (a memory-mapped array: only that slice is read)."""
    return np.asarray(run[offsets[lo] : offsets[hi]])


def eligible(ordinals: np.ndarray, limits: np.ndarray) -> np.ndarray:
    """Mask of ordinals inside their file's eligible prefix (`limits[task]` kept documents: data.max_docs_per_source
    stops counting part-way through a source)."""
    return (ordinals & np.uint64(0xFFFFFFFF)) < limits[(ordinals >> np.uint64(32)).astype(np.int64)]


def exact_duplicates(rec: np.ndarray) -> np.ndarray:
    """Ordinals of the records whose key appeared at a smaller ordinal (first occurrence wins)."""
    if not len(rec):
        return np.zeros(0, np.uint64)
    rec = rec[np.lexsort([rec["ord"], rec["lo"], rec["hi"]])]
    same = (rec["hi"][1:] == rec["hi"][:-1]) & (rec["lo"][1:] == rec["lo"][:-1])
    return np.sort(rec["ord"][1:][same])


def band_groups(rec: np.ndarray, rows: int) -> tuple[np.ndarray, np.ndarray]:
    """(group, ordinal) of every record in a band group of two or more documents; groups numbered from 0."""
    if not len(rec):
        return np.zeros(0, np.int64), np.zeros(0, np.uint64)
    keys = [rec["band"]] + [rec["v"][:, j] for j in range(rows)]
    rec = rec[np.lexsort([rec["ord"], *reversed(keys)])]
    change = np.zeros(len(rec), bool)
    change[0] = True
    change[1:] = rec["band"][1:] != rec["band"][:-1]
    for j in range(rows):
        change[1:] |= rec["v"][1:, j] != rec["v"][:-1, j]
    gid = np.cumsum(change) - 1
    size = np.bincount(gid)
    multi = size[gid] > 1
    _, dense = np.unique(gid[multi], return_inverse=True)
    return dense.ravel().astype(np.int64), rec["ord"][multi]


def resolve_near(groups: np.ndarray, members: np.ndarray) -> np.ndarray:
    """Near duplicates from the band groups alone, as the sequential pass decides them: in ordinal order, a document
    is dropped when a group it is in already has a kept member, else kept. Computed in rounds (each round keeps the
    documents whose earlier group-mates are all dropped, then drops the rest of those groups); chains of near
    duplicates are short, so a handful of rounds suffice. Returns the sorted ordinals dropped."""
    if not len(members):
        return np.zeros(0, np.uint64)
    docs, doc = np.unique(members, return_inverse=True)
    doc = doc.ravel()
    order = np.lexsort([doc, groups])  # pairs by (group, ordinal)
    g, d = groups[order], doc[order]
    state = np.zeros(len(docs), np.int8)  # 0 undecided, 1 kept, 2 dropped
    while True:
        undecided = state[d] == 0
        if not undecided.any():
            break
        alive = state[d] != 2
        ga, da = g[alive], d[alive]
        first = np.ones(len(ga), bool)
        first[1:] = ga[1:] != ga[:-1]
        blocked = np.zeros(len(docs), bool)
        blocked[da[~first]] = True  # a document with a live earlier group-mate must wait (or be dropped)
        newly = (state == 0) & ~blocked
        state[newly] = 1
        has_kept = np.zeros(int(g.max()) + 1, bool)
        has_kept[g[state[d] == 1]] = True
        state[d[has_kept[g] & (state[d] == 0)]] = 2
    return docs[state == 2]
