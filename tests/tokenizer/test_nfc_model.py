"""A self-contained tokenizer.model: NFC compiled into SentencePiece's normalizer, so raw sentencepiece, our
Tokenizer and transformers' AutoTokenizer give the same ids on NFD Korean, decomposed jamo and combining accents."""

from __future__ import annotations

import os
import unicodedata

import pytest
import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2 as spm_pb2

from tokenizer.nfc import RULE_NAME, nfc_rules
from tokenizer.tokenizer import Tokenizer

os.environ.setdefault("HF_HUB_OFFLINE", "1")

NFD = lambda s: unicodedata.normalize("NFD", s)  # noqa: E731
CASES = [
    NFD("한국어 문장"),  # the example: macOS-style NFD Hangul
    NFD("대한민국 헌법 제1조 ① 대한민국은 민주공화국이다. 값은 12,345원."),
    "\u1112\u1161\u11ab\u1100\u1173\u11af",  # 한글 as conjoining jamo
    "\uac00\u11a8 \ud558\u11ab",  # LV syllables + a trailing T jamo: 각 한
    NFD("café naïve résumé Ångström Éire"),
    "e\u0301 a\u0308 o\u0302\u0323 o\u0323\u0302",  # combining accents, marks in either order (ộ)
    "\u212b \u2126 \uf900\uf901 \u2000",  # singletons: Angstrom sign, Ohm sign, CJK compatibility ideographs
    NFD("Ελληνικά ελληνικά, Tiếng Việt có dấu"),
    "이미 NFC인 문장은 그대로: 한국어, café, ① ㄱㄴㄷ ᄀ ᅡ",
]


@pytest.fixture(scope="module")
def hf_tokenizer(tiny_tokenizer):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tiny_tokenizer))


def test_model_carries_the_nfc_map(tiny_tokenizer):
    proto = spm_pb2.ModelProto()
    proto.ParseFromString((tiny_tokenizer / "tokenizer.model").read_bytes())
    assert proto.normalizer_spec.name == RULE_NAME and len(proto.normalizer_spec.precompiled_charsmap) > 10_000
    assert not proto.normalizer_spec.add_dummy_prefix and not proto.normalizer_spec.remove_extra_whitespaces


@pytest.mark.parametrize("text", CASES)
def test_raw_sentencepiece_equals_tokenizer_and_autotokenizer(tiny_tokenizer, hf_tokenizer, text):
    raw = spm.SentencePieceProcessor(model_file=str(tiny_tokenizer / "tokenizer.model"))
    ours = Tokenizer.from_dir(tiny_tokenizer)
    expected = ours.encode(text)
    assert raw.encode(text) == expected
    assert hf_tokenizer(text, add_special_tokens=False).input_ids == expected
    assert raw.decode(raw.encode(text)) == unicodedata.normalize("NFC", text)


def test_rules_are_nfc_and_never_touch_nfc_text():
    rules = nfc_rules()
    assert rules[NFD("한")] == "한" and rules["\uac00\u11a8"] == "각" and rules["e\u0301"] == "é"
    for src, dst in rules.items():
        assert unicodedata.normalize("NFC", src) == dst != src
