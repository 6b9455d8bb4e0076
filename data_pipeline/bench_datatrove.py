"""`python -m data_pipeline.bench_datatrove TEXT_DIR OUT_DIR [ours|datatrove]`: our dedup against datatrove's
MinHash pipeline on the same documents (one process each, run separately so each peak RSS is its own).

TEXT_DIR: the `text/` of a prepare run without dedup (every document that passed the quality rules, in (source,
file, row) order), e.g. `data.dedup.exact=false data.dedup.near=false data.write_text=true data.val_fraction=0`
with every source's weight 1. Same banding (datatrove `num_buckets` x `hashes_per_bucket` = our bands x rows at
dedup.threshold 0.8, 64 permutations: 5 x 11), 5-gram shingles (ours: characters; datatrove: whitespace
words). Needs `pip install datatrove orjson`. Prints a JSON
line with seconds, peak RSS and the ids removed; `compare` prints the agreement of two such lines.
"""

from __future__ import annotations

import json
import resource
import sys
import time
from pathlib import Path

import numpy as np


def _docs(text_dir: Path):
    for path in sorted(text_dir.glob("*.jsonl")):
        with open(path, encoding="utf-8") as fh:
            for line in fh:
                rec = json.loads(line)
                yield rec["id"], rec["text"]


def ours(text_dir: Path, out: Path) -> dict:
    from data_pipeline.config import DedupConfig
    from data_pipeline.dedup import (
        band_groups,
        band_run,
        exact_duplicates,
        exact_key,
        exact_run,
        lsh_params,
        permutations,
        resolve_near,
        signature,
    )

    cfg = DedupConfig()
    perms = permutations(cfg.num_perm)
    bands, rows = lsh_params(cfg.threshold, cfg.num_perm)
    ids, keys, sigs, sig_ords = [], [], [], []
    for i, (doc_id, text) in enumerate(_docs(text_dir)):
        ids.append(doc_id)
        keys.append(np.frombuffer(exact_key(text), np.uint8))
        if len(text) >= cfg.min_chars:
            sigs.append(signature(text, cfg, perms))
            sig_ords.append(i)
    ords = np.arange(len(ids), dtype=np.uint64)
    xrec, _ = exact_run(np.stack(keys), ords)
    exact = exact_duplicates(xrec)
    brec, _ = band_run(np.stack(sigs), np.asarray(sig_ords, np.uint64), bands, rows)
    brec = brec[~np.isin(brec["ord"], exact)]
    near = resolve_near(*band_groups(brec, rows))
    return {"removed": sorted(ids[int(i)] for i in np.concatenate([exact, near]))}


def datatrove(text_dir: Path, out: Path) -> dict:
    from datatrove.executor import LocalPipelineExecutor
    from datatrove.pipeline.dedup import (
        MinhashDedupBuckets,
        MinhashDedupCluster,
        MinhashDedupFilter,
        MinhashDedupSignature,
    )
    from datatrove.pipeline.dedup.minhash import MinhashConfig
    from datatrove.pipeline.readers import JsonlReader
    from datatrove.pipeline.writers import JsonlWriter
    from datatrove.utils.word_tokenizers import WordTokenizer

    class Eojeol(WordTokenizer):
        """Words split on whitespace (eojeol). datatrove's Korean tokenizer (Kiwi) needs model files that did not
        load here (kiwipiepy 0.24.1 with kiwipiepy_model 0.24.0), its fallback needs spaCy."""

        def word_tokenize(self, text: str) -> list[str]:
            return text.split()

        def sent_tokenize(self, text: str) -> list[str]:
            return text.split("\n")

        def span_tokenize(self, text: str) -> list[tuple[int, int]]:
            raise NotImplementedError

    cfg = MinhashConfig(n_grams=5, num_buckets=5, hashes_per_bucket=11)
    words = Eojeol()
    import datatrove.utils.hashes.xxhash as dx
    import xxhash

    # datatrove 0.10.1 passes str to xxhash, which xxhash 4.x refuses: encode first (same hash, same speed).
    dx.xxhash64 = lambda data: xxhash.xxh64_intdigest(data.encode() if isinstance(data, str) else data)
    reader = JsonlReader(str(text_dir), id_key="id")
    root = str(out / "dt")
    stages = [
        [reader, MinhashDedupSignature(f"{root}/sigs", config=cfg, language=words)],
        [MinhashDedupBuckets(f"{root}/sigs", f"{root}/buckets", config=cfg)],
        [MinhashDedupCluster(f"{root}/buckets", f"{root}/remove_ids", config=cfg)],
        [reader, MinhashDedupFilter(f"{root}/remove_ids", exclusion_writer=JsonlWriter(f"{root}/removed"))],
    ]
    for i, pipeline in enumerate(stages):
        tasks = cfg.num_buckets if i == 1 else 1
        LocalPipelineExecutor(pipeline, tasks=tasks, workers=1, logging_dir=f"{root}/logs{i}").run()
    removed = []
    for path in sorted(Path(f"{root}/removed").glob("*.jsonl*")):
        import gzip

        with gzip.open(path, "rt", encoding="utf-8") if path.suffix == ".gz" else open(path) as fh:
            removed += [json.loads(line)["id"] for line in fh]
    return {"removed": sorted(removed)}


def main() -> None:
    if sys.argv[1] == "compare":
        a, b = (json.loads(Path(p).read_text()) for p in sys.argv[2:4])
        x, y = set(a["removed"]), set(b["removed"])
        print(json.dumps({"a": len(x), "b": len(y), "both": len(x & y), "only_a": len(x - y), "only_b": len(y - x)}))
        return
    text_dir, out, which = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    result = {"ours": ours, "datatrove": datatrove}[which](text_dir, out)
    kib = 1024 if sys.platform != "darwin" else 1
    result = {
        "which": which,
        "seconds": round(time.perf_counter() - start, 1),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * kib / 1e6),
        "peak_rss_children_mb": round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * kib / 1e6),
        "n_removed": len(result["removed"]),
        **result,
    }
    (out / f"{which}.json").write_text(json.dumps(result))
    print(json.dumps({k: v for k, v in result.items() if k != "removed"}))


if __name__ == "__main__":
    main()
