"""Near-duplicate index: the same LSH banding as datasketch, and the same decisions."""

from __future__ import annotations

import numpy as np
import pytest

from data_pipeline.config import DedupConfig
from data_pipeline.dedup import Deduplicator, exact_key, lsh_params, permutations, signature


@pytest.mark.parametrize("threshold", [0.5, 0.7, 0.8, 0.9])
@pytest.mark.parametrize("num_perm", [16, 64, 128])
def test_band_layout_equals_datasketch(threshold, num_perm):
    from datasketch.lsh import _optimal_param

    assert lsh_params(threshold, num_perm) == _optimal_param(threshold, num_perm, 0.5, 0.5)


def test_decisions_equal_datasketch_minhash_lsh():
    from datasketch import LeanMinHash, MinHashLSH

    cfg = DedupConfig(threshold=0.7, num_perm=64)
    perms = permutations(cfg.num_perm)
    rng = np.random.default_rng(0)
    words = [f"w{i}" for i in range(400)]
    base = [" ".join(rng.choice(words, 80)) for _ in range(30)]
    # Originals, light edits (near duplicates), heavy edits (not), and exact copies.
    docs = base + [b.replace("w1", "v1", 3) for b in base] + [" ".join(rng.choice(words, 80)) for _ in base] + base[:5]
    ours, ref = Deduplicator(cfg), MinHashLSH(threshold=cfg.threshold, num_perm=cfg.num_perm)
    got, want = [], []
    for i, text in enumerate(docs):
        sig = signature(text, cfg, perms)
        got.append(ours.check(exact_key(text), sig))
        mh = LeanMinHash(seed=1, hashvalues=sig, scheme="affine32")
        if exact_key(text) in {exact_key(t) for t in docs[:i]}:
            want.append("exact_duplicate")
        elif ref.query(mh):
            want.append("near_duplicate")
        else:
            ref.insert(i, mh, check_duplication=False)
            want.append(None)
    assert got == want
    assert got.count("near_duplicate") >= 20 and got.count("exact_duplicate") == 5
