"""prepare end to end on planted inputs: per-row rejection, dedup, per-document licenses, mixture, audit text,
and byte-identical output for any number of workers or parts."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from data_pipeline.config import DataConfig, DedupConfig, FilterConfig, SourceConfig
from data_pipeline.prepare import prepare
from data_pipeline.shards import MANIFEST
from tests.helpers import sample_data_config
from tokenizer.tokenizer import Tokenizer

ARTICLE = (
    "한강은 대한민국의 중부를 흐르는 강으로, 강원도와 충청북도, 경기도를 거쳐 서울특별시를 지나 황해로 흘러든다. "
    "유역 면적은 약 이만 육천 제곱킬로미터이며 수도권 주민의 식수원으로 쓰인다. "
)


RULES_OFF = {
    "min_hangul_share": 0.0,
    "max_symbol_share": 1.0,
    "max_dup_line_share": 1.0,
    "max_top_ngram_share": 1.0,
    "min_mean_word_length": 0.0,
    "max_mean_word_length": 0.0,
    "max_char_repetition": 1.0,
    "max_word_repetition": 1.0,
    "min_line_punct_share": 0.0,
    "max_short_line_share": 1.0,
}


def quiet(*_):
    pass


def write_jsonl(path: Path, lines: list) -> None:
    with open(path, "wb") as fh:
        for line in lines:
            fh.write(line if isinstance(line, bytes) else json.dumps(line, ensure_ascii=False).encode())
            fh.write(b"\n")


@pytest.fixture()
def planted(tmp_path) -> DataConfig:
    d = tmp_path / "in"
    d.mkdir()
    long_doc = ARTICLE * 4
    write_jsonl(
        d / "a.jsonl",
        [
            {"text": long_doc},
            b'{"text": "broken',  # malformed JSON
            b'{"text": "\xff\xfe bad bytes"}',  # invalid UTF-8
            {"title": "no text field"},
            {"text": "   "},
            {"text": "가" * 5000},  # huge under max_chars=4000
            {"text": long_doc},  # exact duplicate within the file
            {"text": "연락처 010-1234-5678, 메일 kim@example.com 입니다. 회의는 화요일 오후 세 시에 열립니다."},
            {"text": ARTICLE + " 허용되지 않은 라이선스", "license": "CC-BY-NC-4.0"},  # per-document license
            [1, 2, 3],  # not an object
        ],
    )
    write_jsonl(d / "b.jsonl", [{"text": long_doc.replace("약", "대략", 1)}, {"text": "다른 이야기 " * 40}])
    pq.write_table(pa.table({"review": [long_doc, "재밌어요", "재밌어요", None]}), d / "r.parquet")
    (d / "broken.parquet").write_bytes(b"this is not parquet")
    return DataConfig(
        name="planted",
        sources={
            "wiki": SourceConfig(paths=[str(d / "*.jsonl")], license="CC-BY-SA-3.0", license_field="license"),
            "reviews": SourceConfig(paths=[str(d / "*.parquet")], format="parquet", text="review", license="CC0-1.0"),
        },
        allowed_licenses=["CC-BY-SA-3.0", "CC0-1.0"],
        val_fraction=0.0,
        # Quality rules off (this test is about row accounting and dedup; its documents repeat one article).
        filters=FilterConfig(min_chars=2, max_chars=4000, **RULES_OFF),
        dedup=DedupConfig(threshold=0.7, min_chars=100),
        write_text=True,
        num_workers=1,
    )


def test_every_row_is_counted_under_its_reason(planted, tiny_tokenizer, tmp_path):
    m = prepare(planted, Tokenizer.from_dir(tiny_tokenizer), str(tiny_tokenizer), tmp_path / "out", log=quiet)
    wiki, reviews = m["sources"]["wiki"], m["sources"]["reviews"]
    assert wiki["rejected"] == {
        "malformed_json": 2,
        "invalid_utf8": 1,
        "missing_text": 1,
        "empty": 1,
        "huge": 1,
        "exact_duplicate": 1,
        "license_not_allowed": 1,
        "near_duplicate": 1,
    }
    assert wiki["docs_kept"] == 3 and wiki["docs_in"] == 12
    # Across sources: the review repeating the wiki article is a duplicate too; the broken file is one rejection.
    assert reviews["rejected"] == {"exact_duplicate": 2, "missing_text": 1, "unreadable_file": 1}
    assert reviews["docs_kept"] == 1
    for s in m["sources"].values():
        assert s["docs_in"] == s["docs_kept"] + sum(s["rejected"].values())
    assert wiki["pii_replaced"] == {"email": 1, "phone": 1}
    assert wiki["document_licenses"] == {"CC-BY-SA-3.0": 3}
    texts = [json.loads(line) for line in (tmp_path / "out" / "text" / "wiki.jsonl").read_text().splitlines()]
    assert len(texts) == 3 and "<PHONE>" in texts[1]["text"] and "<EMAIL>" in texts[1]["text"]
    assert not (tmp_path / "out" / "work").exists()


def shard_bytes(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.glob("*.bin"))} | {MANIFEST: (out / MANIFEST).read_bytes()}


def test_output_is_byte_identical_for_any_workers_or_parts(tiny_tokenizer, tmp_path):
    tok = Tokenizer.from_dir(tiny_tokenizer)
    base = {"max_docs_per_source": 150, "shard_tokens": 20_000}
    one = tmp_path / "one"
    prepare(sample_data_config(**base, num_workers=1), tok, "tok", one, log=quiet)
    two = tmp_path / "two"
    prepare(sample_data_config(**base, num_workers=2), tok, "tok", two, log=quiet)
    parts = tmp_path / "parts"
    for i in range(3):  # as a SLURM array would, each part alone
        summary = prepare(sample_data_config(**base, num_shards=3, shard_index=i), tok, "tok", parts, log=quiet)
        assert summary["part"] == i and not (parts / MANIFEST).exists()
    merged = prepare(sample_data_config(**base, num_shards=3), tok, "tok", parts, log=quiet)
    assert merged["splits"]["train"]["tokens"] > 0
    ref = shard_bytes(one)
    assert len(ref) > 3
    assert shard_bytes(two) == ref
    assert shard_bytes(parts) == ref


def test_merge_reuses_finished_parts(tiny_tokenizer, tmp_path):
    from data_pipeline.prepare import make_tasks, run_work
    from data_pipeline.shards import token_dtype

    tok = Tokenizer.from_dir(tiny_tokenizer)
    data = sample_data_config(max_docs_per_source=30, num_workers=1)
    work = tmp_path / "out" / "work"
    work.mkdir(parents=True)
    tasks = make_tasks(data)
    assert run_work(data, tok, tasks, token_dtype(tok.vocab_size), work, quiet) == len(tasks)
    assert run_work(data, tok, tasks, token_dtype(tok.vocab_size), work, quiet) == 0


def test_mixture_weights_upsample_and_cap_deterministically(tiny_tokenizer, tmp_path):
    tok = Tokenizer.from_dir(tiny_tokenizer)
    over = {"max_docs_per_source": 200, "val_fraction": 0.0}
    ref = prepare(sample_data_config(**over), tok, "tok", tmp_path / "ref", log=quiet)["sources"]
    mixed = sample_data_config(
        **over, sources={"nsmc": {"weight": 2.0}, "chatbot": {"weight": 0.5}, "kowiki": {"max_tokens": 20_000}}
    )
    a = prepare(mixed, tok, "tok", tmp_path / "a", log=quiet)
    prepare(mixed, tok, "tok", tmp_path / "b", log=quiet)
    assert shard_bytes(tmp_path / "a") == shard_bytes(tmp_path / "b")
    s = a["sources"]
    assert s["nsmc"]["train_tokens"] == 2 * ref["nsmc"]["train_tokens"]
    assert 0.3 < s["chatbot"]["train_tokens"] / ref["chatbot"]["train_tokens"] < 0.7
    assert s["chatbot"]["rejected"]["mixture"] > 0
    assert s["kowiki"]["train_tokens"] <= 20_000 and s["kowiki"]["rejected"]["capped"] > 0
    assert a["splits"]["train"]["tokens"] == sum(x["train_tokens"] for x in s.values())
    for x in s.values():
        assert x["docs_in"] == x["docs_kept"] + sum(x["rejected"].values())


def test_cli_parts_then_merge(tiny_tokenizer, tmp_path):
    from tests.helpers import run_module

    out = tmp_path / "out"
    common = [f"tokenizer.path={tiny_tokenizer}", f"out={out}", "data.max_docs_per_source=20", "data.num_shards=2"]
    for i in range(2):
        part = json.loads(run_module("data_pipeline.prepare", *common, f"data.shard_index={i}").stdout.splitlines()[-1])
        assert part["part"] == i and part["processed"] >= 1
    summary = json.loads(run_module("data_pipeline.merge", *common).stdout.splitlines()[-1])
    assert summary["tokens"]["train"] > 0 and (out / MANIFEST).is_file()


def test_prepare_says_why_documents_were_rejected_and_which_files_gave_none(planted, tiny_tokenizer, tmp_path):
    (tmp_path / "in" / "c_empty.jsonl").write_text("")
    lines: list[str] = []
    prepare(planted, Tokenizer.from_dir(tiny_tokenizer), str(tiny_tokenizer), tmp_path / "out", log=lines.append)
    wiki = next(line for line in lines if line.startswith("[prepare] wiki:"))
    assert wiki.startswith("[prepare] wiki: 3/12 docs") and "; rejected: malformed_json 2, " in wiki, wiki
    for reason in ("invalid_utf8 1", "missing_text 1", "empty 1", "huge 1", "exact_duplicate 1", "near_duplicate 1"):
        assert reason in wiki, (reason, wiki)
    reviews = next(line for line in lines if line.startswith("[prepare] reviews:"))
    assert "rejected: exact_duplicate 2, missing_text 1, unreadable_file 1" in reviews, reviews
    warnings = [line for line in lines if "warning" in line]
    assert len(warnings) == 2, warnings
    assert any("c_empty.jsonl gave no documents (no rows read" in w for w in warnings), warnings
    assert any("broken.parquet gave no documents (all 1 rejected: unreadable_file 1)" in w for w in warnings), warnings
