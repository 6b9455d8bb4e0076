"""`python -m data_pipeline.bench_filters [data=shared_ko] [examples=4]`: what each quality rule removes, per source.

Every document of the data config through `quality_reason` (with the config's per-source overrides), no
tokenizing: one JSON line of counts per source and rule, then a few removed documents per rule (seeded sample,
first 300 characters) so a reader can judge the precision.
"""

from __future__ import annotations

import json
import random
import sys
from collections import Counter, defaultdict
from pathlib import Path

from omegaconf import OmegaConf

from data_pipeline.clean import clean_text, quality_reason
from data_pipeline.config import DataConfig
from data_pipeline.sources import Document, iter_source


def main() -> None:
    args = dict(a.split("=", 1) for a in sys.argv[1:])
    raw = OmegaConf.load(
        Path(__file__).resolve().parents[1] / "configs" / "data" / f"{args.get('data', 'shared_ko')}.yaml"
    )
    data: DataConfig = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(DataConfig), raw))
    counts: dict[str, Counter] = defaultdict(Counter)
    totals: Counter = Counter()
    removed: dict[str, list] = defaultdict(list)
    for name, src in data.sources.items():
        filters = data.source_filters(name)
        for item in iter_source(name, src):
            if not isinstance(item, Document):
                continue
            totals[name] += 1
            text = clean_text(item.text)
            reason = quality_reason(text, filters, src.language) if text.strip() else None
            if reason:
                counts[name][reason] += 1
                removed[reason].append([item.doc_id, len(text), text[:300].replace("\n", " / ")])
    print(json.dumps({"documents": totals, "removed": counts}, ensure_ascii=False))
    rng = random.Random(0)
    for reason, docs in sorted(removed.items()):
        for doc in rng.sample(docs, min(int(args.get("examples", 4)), len(docs))):
            print(json.dumps({"rule": reason, "id": doc[0], "chars": doc[1], "start": doc[2]}, ensure_ascii=False))


if __name__ == "__main__":
    main()
