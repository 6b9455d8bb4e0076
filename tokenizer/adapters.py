"""A Hugging Face `tokenizer.json` as a pipeline and trainer tokenizer (data_pipeline/text_tokenizer.py's
TextTokenizer, plus `encode`, `decode` and `token_bytes` for evaluation and bits per byte).

Used for ablations against other tokenizers, e.g. Polyglot-Ko's:
`python -m data_pipeline.prepare ... tokenizer.path=../shared/reference_tokenizers/polyglot-ko
tokenizer.loader=tokenizer.adapters:HFTokenizer.from_dir` and the same two keys for `train.pretrain`.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer as _Fast

EOS_NAMES = ("<|endoftext|>", "</s>", "<eos>", "<|end_of_text|>")


def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet: printable character -> the byte it stands for."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs, strict=True)}


class HFTokenizer:
    """`DIR/tokenizer.json` through the `tokenizers` library; no bos/eos added by `encode`. Picklable."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self._load(self.path.read_bytes())

    @classmethod
    def from_dir(cls, path: str | Path) -> HFTokenizer:
        file = Path(path) / "tokenizer.json"
        if not file.is_file():
            raise FileNotFoundError(f"no tokenizer.json in {str(path)!r}: point tokenizer.path at a HF tokenizer dir")
        return cls(file)

    def _load(self, raw: bytes) -> None:
        self._raw = raw
        self._sha256 = hashlib.sha256(raw).hexdigest()
        self._tok = _Fast.from_str(raw.decode("utf-8"))
        spec = json.loads(raw)
        self._added = {t["id"]: t for t in spec.get("added_tokens", [])}
        self._byte_level = "ByteLevel" in json.dumps(spec.get("decoder"))
        names = {t["content"]: i for i, t in self._added.items()}
        self._eos = next((names[n] for n in EOS_NAMES if n in names), -1)

    def __getstate__(self) -> dict:
        return {"path": self.path, "raw": self._raw}

    def __setstate__(self, state: dict) -> None:
        self.path = state["path"]
        self._load(state["raw"])

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    @property
    def eos_id(self) -> int:
        return self._eos

    @property
    def sha256(self) -> str:
        """Hex SHA-256 of tokenizer.json."""
        return self._sha256

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str], num_threads: int = 0) -> list[list[int]]:
        if num_threads > 0:
            os.environ.setdefault("RAYON_NUM_THREADS", str(num_threads))
        return [e.ids for e in self._tok.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: Iterable[int]) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=True)

    def token_bytes(self) -> list[int]:
        """UTF-8 bytes each id stands for: special tokens 0; byte-level pieces one byte per character; others
        their text (bits per byte; see tokenizer.Tokenizer.token_bytes)."""
        table = _byte_decoder() if self._byte_level else None
        out = []
        for i in range(self.vocab_size):
            added = self._added.get(i)
            piece = self._tok.id_to_token(i)
            if added is not None:
                out.append(0 if added.get("special") else len(added["content"].encode("utf-8")))
            elif piece is None:
                out.append(0)
            elif table is not None:
                out.append(sum(1 if c in table else len(c.encode("utf-8")) for c in piece))
            else:
                out.append(len(self._tok.decode([i]).encode("utf-8")))
        return out
