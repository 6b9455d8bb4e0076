"""Cut the repo's small licensed Korean sample from ../shared/corpora (run once; the output is committed).

Usage: python data/samples/make_samples.py [CORPORA_DIR]
Every sample folder keeps the upstream LICENSE.txt and SOURCE next to the data.
"""

from __future__ import annotations

import csv
import json
import shutil
import sys
from pathlib import Path

import pyarrow.parquet as pq

HERE = Path(__file__).resolve().parent


def _copy_license(src: Path, dst: Path) -> None:
    dst.mkdir(parents=True, exist_ok=True)
    for name in ("LICENSE.txt", "SOURCE"):
        shutil.copyfile(src / name, dst / name)


def _head_jsonl(src: Path, dst: Path, n: int) -> None:
    with open(src, encoding="utf-8") as fin, open(dst, "w", encoding="utf-8") as fout:
        for i, line in enumerate(fin):
            if i >= n:
                break
            fout.write(line)


def main(corpora: Path) -> None:
    _copy_license(corpora / "kowiki", HERE / "kowiki")
    _head_jsonl(corpora / "kowiki/kowiki-0001.jsonl", HERE / "kowiki/kowiki-sample.jsonl", 500)

    _copy_license(corpora / "nsmc", HERE / "nsmc")
    table = pq.read_table(corpora / "nsmc/nsmc-0000.parquet").slice(0, 16000)
    pq.write_table(table, HERE / "nsmc/nsmc-sample.parquet")

    _copy_license(corpora / "legal_kr", HERE / "legal_kr")
    _head_jsonl(corpora / "legal_kr/precedents.jsonl", HERE / "legal_kr/precedents-sample.jsonl", 60)
    (HERE / "legal_kr/konlpy").mkdir(exist_ok=True)
    for name in ("kolaw-constitution.txt", "LICENSE.konlpy.txt", "SOURCE"):
        shutil.copyfile(corpora / "legal_kr/konlpy" / name, HERE / "legal_kr/konlpy" / name)

    _copy_license(corpora / "chatbot", HERE / "chatbot")
    with open(corpora / "chatbot/ChatbotData.csv", encoding="utf-8", newline="") as fin:
        rows = list(csv.reader(fin))
    with open(HERE / "chatbot/chatbot-sample.csv", "w", encoding="utf-8", newline="") as fout:
        csv.writer(fout).writerows(rows[:1] + rows[1::2])
    # Not Korean, not in the ko_sample mixture: small English and code samples for tokenizer tests.
    _copy_license(corpora / "code", HERE / "code")
    _head_jsonl(corpora / "code/cpython311_stdlib.jsonl", HERE / "code/cpython-sample.jsonl", 16)
    _copy_license(corpora / "english_wiki", HERE / "english_wiki")
    _head_jsonl(corpora / "english_wiki/wikitext2_test.jsonl", HERE / "english_wiki/wikitext-sample.jsonl", 6)
    json.dump({"made_from": str(corpora)}, sys.stdout)


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else HERE.parents[2] / "shared/corpora")
