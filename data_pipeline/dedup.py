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
