"""Rebuild this folder from KoBEST v1.0's TSV files (SKT-LSL/KoBEST_datarepo, folder v1.0/, commit 2956e24):

    python data/eval/kobest/convert.py ../shared/evals/kobest

Writes TASK/{train,validation,test}.parquet with the column names and label encodings of the Hugging Face copy
(`skt/kobest_v1`), which lm-evaluation-harness's KoBEST tasks read: rows and texts unchanged, in file order.
"""

from __future__ import annotations

import csv
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

SPLITS = {"train": "train", "dev": "validation", "test": "test"}


def _bool(v: str) -> int:
    return {"true": 1, "false": 0}[v.strip().lower()]


ROWS = {
    "boolq": ("BoolQ", lambda r: {"paragraph": r["Text"], "question": r["Question"], "label": _bool(r["Answer"])}),
    "copa": (
        "COPA",
        lambda r: {
            "premise": r["sentence"],
            "question": r["question"],
            "alternative_1": r["1"],
            "alternative_2": r["2"],
            "label": int(r["Answer"]) - 1,
        },
    ),  # fmt: skip
    "hellaswag": (
        "HellaSwag",
        lambda r: {
            "context": r["context"],
            **{f"ending_{i}": r[f"choice{i}"] for i in (1, 2, 3, 4)},
            "label": int(r["label"]),
        },
    ),
    "sentineg": ("SentiNeg", lambda r: {"sentence": r["Text"], "label": int(r["Label"])}),
    "wic": (
        "WiC",
        lambda r: {
            "word": r["Target"],
            "context_1": r["SENTENCE1"],
            "context_2": r["SENTENCE2"],
            "label": _bool(r["ANSWER"]),
        },
    ),
}


def main(src: Path, out: Path) -> None:
    csv.field_size_limit(1 << 30)
    for task, (folder, row) in ROWS.items():
        (out / task).mkdir(parents=True, exist_ok=True)
        for name, split in SPLITS.items():
            with open(src / folder / f"{name}.tsv", newline="", encoding="utf-8") as f:
                rows = [row(r) for r in csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE)]
            pq.write_table(pa.Table.from_pylist(rows), out / task / f"{split}.parquet", compression="zstd")
            print(task, split, len(rows))


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(__file__).resolve().parent)
