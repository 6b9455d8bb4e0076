"""Cleaning, quality filters and PII scrubbing: planted PII is replaced, look-alikes survive."""

from __future__ import annotations

import unicodedata

import numpy as np
import pytest

from data_pipeline.clean import clean_text, quality_reason
from data_pipeline.config import FilterConfig
from data_pipeline.pii import scrub

PII = [
    ("문의: hong.gildong@example.co.kr 로 보내세요", "<EMAIL>"),
    ("연락처 010-1234-5678 입니다", "<PHONE>"),
    ("휴대폰 01012345678", "<PHONE>"),
    ("국제 +82 10-9876-5432", "<PHONE>"),
    ("대표번호 02-123-4567", "<PHONE>"),
    ("지사 (031) 765-4321", "<PHONE>"),
    ("주민등록번호 900101-1234567", "<RRN>"),
    ("외국인 851231-5123456", "<RRN>"),
    ("카드 4111-1111-1111-1111 결제", "<CARD>"),
    ("카드 5500 0000 0000 0004", "<CARD>"),
    ("서버 192.168.0.1 에 접속", "<IP>"),
]

LOOK_ALIKES = [
    "대법원 2000므1257 판결",
    "2019다12345 손해배상",
    "2020-12-31 선고",
    "2023.01.15. 공포",
    "헌법 제3조 제1항",
    "가격은 12,000원, 총 1,234,567원",
    "1592-1598년 임진왜란",
    '__version__ = "3.11.4"',
    "x = 0x7f000001  # loopback",
    "    return a @ b  # matmul",
    "카드번호처럼 보이는 4111-1111-1111-1112 (Luhn 불일치)",
    "주문번호 20231231-0001",
    "ISBN 978-89-1234-567-8",
]


@pytest.mark.parametrize("text,placeholder", PII)
def test_planted_pii_is_replaced(text, placeholder):
    out = scrub(text)
    assert out.count(placeholder) == 1 and out.count("<") == 1, out
    assert scrub(out) == out


@pytest.mark.parametrize("text", LOOK_ALIKES)
def test_look_alikes_survive(text):
    assert scrub(text) == text


def test_scrub_counts_by_type():
    from collections import Counter

    counts = Counter()
    scrub("a@b.com, 010-1111-2222, 900101-1234567, 10.0.0.1", counts)
    assert counts == {"email": 1, "phone": 1, "rrn": 1, "ip": 1}


def test_clean_normalizes_and_keeps_indentation():
    nfd = unicodedata.normalize("NFD", "한국어")
    code = "def f():\r\n\tif x:\r\n        return 1\x00\x07\ufeff"
    assert clean_text(nfd) == "한국어"
    assert clean_text(code) == "def f():\n\tif x:\n        return 1"


def test_each_quality_rule_names_its_reason():
    f = FilterConfig(
        min_chars=5,
        max_chars=10_000,
        min_hangul_share=0.5,
        max_symbol_share=0.3,
        max_dup_line_share=0.3,
        max_top_ngram_share=0.2,
        ngram_min_words=20,
    )
    assert quality_reason("짧다", f, "ko") == "too_short"
    assert quality_reason("가" * 10_001, f, "ko") == "huge"
    assert quality_reason("This is mostly English text with 한 word", f, "ko") == "low_hangul"
    assert quality_reason("This is English text", f, "en") is None  # the Hangul rule is for Korean sources
    assert quality_reason("안녕하세요 #### $$$$ %%%% &&&& ****", f, "ko") == "symbols"
    assert quality_reason("\n".join(["같은 줄입니다"] * 5 + ["다른 줄"]), f, "ko") == "repeated_lines"
    assert quality_reason(" ".join(["나는 밥을 먹었다"] * 10), f, "ko") == "repeated_ngrams"
    assert quality_reason("대한민국은 민주공화국이다. 대한민국의 주권은 국민에게 있다.", f, "ko") is None


# ---- quality rules on by default ----

PROSE = (
    "한강은 대한민국의 중부를 흐르는 강이다. 유역 면적은 약 이만 육천 제곱킬로미터이며 수도권의 식수원으로 쓰인다.\n"
    "조선 시대에는 수운의 중심이었고, 지금은 공원과 다리가 늘어서 있다.\n"
    "여름이면 강변에서 축제가 열리고 많은 시민이 자전거를 타며 산책을 즐긴다.\n"
)


def test_defaults_keep_ordinary_korean_prose_and_short_texts():
    f = FilterConfig()
    assert quality_reason(clean_text(PROSE), f, "ko") is None
    for short in ("재밌어요", "ㅋㅋㅋㅋㅋㅋㅋㅋㅋㅋㅋㅋ", "진짜재밌게봤어요정말최고의영화", "안녕\n반가워"):
        assert quality_reason(short, f, "ko") is None, short


_RNG = np.random.default_rng(0)
_SYL = list("가나라마바사아자차카타파하고노도로모보소오조초코토포호")
# 40 lines of five random three-syllable words, none ending a sentence: a list of headings or link titles.
HEADINGS = "\n".join(" ".join("".join(_RNG.choice(_SYL, 3)) for _ in range(5)) for _ in range(40))


@pytest.mark.parametrize(
    "text,reason",
    [
        ("가" * 3_000_000, "word_length"),  # one syllable three million times: no spaces, no words
        ("가 나 " * 200, "word_length"),  # one-character "words"
        (("한강공원의 자전거길 " * 3 + "\n") * 40, "repeated_chars"),
        (HEADINGS, "line_punctuation"),
        ("\n".join(f"{i}번 항목이다." for i in range(40)) + "\n" + PROSE, "short_lines"),
    ],
)
def test_defaults_reject_by_rule(text, reason):
    assert quality_reason(text, FilterConfig(), "ko") == reason


def test_word_repetition_counts_characters_in_repeated_five_grams():
    from data_pipeline.clean import word_repetition

    words = [f"w{i}" for i in range(100)]
    assert word_repetition(words) == 0.0
    assert word_repetition(words[:10] * 2) == 1.0
    # w0..w9 twice (2 characters each) among 100 words of 280 characters
    assert word_repetition(words[:50] + words[:10] + words[60:]) == pytest.approx(40 / 280)


def test_prose_rules_skip_code():
    code = "\n".join(f"    x_{i} = f(x_{i - 1})" for i in range(1, 60))
    f = FilterConfig(max_symbol_share=1.0)
    assert quality_reason(code, f, "code") is None
    assert quality_reason(code, f, "en") == "short_lines"


def test_non_string_text_field_is_its_own_rejection(tmp_path):
    from data_pipeline.config import SourceConfig
    from data_pipeline.sources import Document, Rejected, iter_file_docs

    path = tmp_path / "a.jsonl"
    path.write_text('{"text": 12345}\n{"text": "12345"}\n{"text": null}\n{"text": {"a": 1}}\n', encoding="utf-8")
    got = list(iter_file_docs("s", SourceConfig(license="MIT"), 0, path))
    assert got[0] == Rejected("text_not_string") and got[3] == Rejected("text_not_string")
    assert isinstance(got[1], Document) and got[1].text == "12345" and got[2] == Rejected("missing_text")
