"""Unicode NFC compiled into SentencePiece's normalizer, so a `tokenizer.model` loaded by sentencepiece alone (model
converters, serving stacks) gives the ids training used on non-NFC input.

SentencePiece normalizes with a precompiled character map: at each position the longest matching source sequence
is replaced by its target. The rules (`nfc_rules`) map, for every code point whose NFC is not itself or that has a
canonical decomposition: the code point (singletons such as U+212B ANGSTROM SIGN and the CJK compatibility
ideographs) and every spelling of its decomposition, fully or partly composed and with its marks in any order
that NFC puts back (NFD Hangul L V T, a precomposed LV syllable + T, e + U+0301, ...), to NFC. SentencePiece's
trainer compiles them (`normalization_rule_tsv`) on a one-line corpus; the map is then set into our model.
Text NFC leaves alone is never matched. Not covered: NFC's reordering of marks around a base that has no
precomposed form (the Python `normalize` before encoding still applies full NFC in `Tokenizer.encode`).
"""

from __future__ import annotations

import functools
import itertools
import sys
import tempfile
import unicodedata
from pathlib import Path

import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2 as spm_pb2

RULE_NAME = "nfc_hangang"
"""normalizer_spec.name of a model carrying this map (SentencePiece uses the map, not the name, at run time)."""


def nfc_rules() -> dict[str, str]:
    """{source: NFC(source)} for the spellings described in the module docstring."""
    rules: dict[str, str] = {}
    for cp in range(sys.maxunicode + 1):
        if 0xD800 <= cp <= 0xDFFF:
            continue
        ch = chr(cp)
        target = unicodedata.normalize("NFC", ch)
        if target != ch:
            rules[ch] = target
        nfd = unicodedata.normalize("NFD", ch)
        if len(nfd) < 2:
            continue
        base, marks = nfd[0], nfd[1:]
        orders = itertools.permutations(marks) if len(marks) <= 3 else [marks]
        for order in {"".join(o) for o in orders}:
            for k in range(len(order) + 1):  # the base with its first k marks composed, the rest spelled out
                head = unicodedata.normalize("NFC", base + order[:k])
                seq = head + order[k:]
                if seq != target and unicodedata.normalize("NFC", seq) == target:
                    rules[seq] = target
    # Hangul: NFD syllables are L V (T); a precomposed LV syllable followed by a T jamo composes too.
    for s in range(0xAC00, 0xD7A4):
        syllable = chr(s)
        jamo = unicodedata.normalize("NFD", syllable)
        rules[jamo] = syllable
        if len(jamo) == 3:
            rules[unicodedata.normalize("NFC", jamo[:2]) + jamo[2]] = syllable
    return rules


@functools.lru_cache(maxsize=1)
def nfc_charsmap() -> bytes:
    """SentencePiece's precompiled character map of `nfc_rules()` (built once per process, a few seconds)."""
    with tempfile.TemporaryDirectory() as tmp:
        tsv, corpus = Path(tmp) / "nfc.tsv", Path(tmp) / "corpus.txt"
        rows = (" ".join(f"{ord(c):X}" for c in src) + "\t" + " ".join(f"{ord(c):X}" for c in dst)
                for src, dst in sorted(nfc_rules().items()))  # fmt: skip
        tsv.write_text("\n".join(rows) + "\n")
        corpus.write_text("abc 한국어 문장\n" * 20)
        spm.SentencePieceTrainer.train(
            input=str(corpus), model_prefix=str(Path(tmp) / "m"), vocab_size=20, model_type="char",
            normalization_rule_tsv=str(tsv), add_dummy_prefix=False, remove_extra_whitespaces=False,
            minloglevel=2,
        )  # fmt: skip
        proto = spm_pb2.ModelProto()
        proto.ParseFromString((Path(tmp) / "m.model").read_bytes())
        return proto.normalizer_spec.precompiled_charsmap


def add_nfc_normalizer(model_bytes: bytes) -> bytes:
    """The model with NFC compiled into its normalizer (identity models only; everything else unchanged)."""
    proto = spm_pb2.ModelProto()
    proto.ParseFromString(model_bytes)
    spec = proto.normalizer_spec
    if spec.name not in ("identity", RULE_NAME):
        raise ValueError(f"normalizer {spec.name!r}: only identity models get the NFC map")
    spec.name = RULE_NAME
    spec.precompiled_charsmap = nfc_charsmap()
    return proto.SerializeToString(deterministic=True)


def has_nfc_map(model_path: str | Path) -> bool:
    """Whether a tokenizer.model carries this NFC map (trained by this version of tokenizer.train)."""
    proto = spm_pb2.ModelProto()
    proto.ParseFromString(Path(model_path).read_bytes())
    return proto.normalizer_spec.name == RULE_NAME and bool(proto.normalizer_spec.precompiled_charsmap)
