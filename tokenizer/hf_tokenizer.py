"""A Hugging Face tokenizer directory (tokenizer.json) behind the interface the pipeline and training use, so data
can be prepared and a run trained with an open model's tokenizer (`init.from_hf`) or its Korean extension
(`tokenizer.extend`). `load_any` picks the project's SentencePiece tokenizer or this adapter by the files present."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from pathlib import Path

from tokenizer.tokenizer import MODEL_FILE, Tokenizer

EXTENSION_FILE = "hangang_extension.json"
"""Written by `tokenizer.extend`: the base vocabulary size and each added piece's base tokenization."""

EOS_NAMES = ("<|endoftext|>", "</s>", "<eos>", "<|end_of_text|>")
"""End-of-text tokens looked up among the added tokens when no tokenizer_config.json names one (Polyglot-Ko)."""


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


class HFTextTokenizer:
    """tokenizer.json (and tokenizer_config.json for the special tokens) of an HF directory; picklable."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        tj = self.path / "tokenizer.json"
        if not tj.is_file():
            raise FileNotFoundError(
                f"no tokenizer.json in tokenizer directory {str(path)!r}: give a Hugging Face tokenizer directory "
                "(fast tokenizer) or one trained by python -m tokenizer.train"
            )
        self._load(tj.read_bytes())

    def _load(self, data: bytes) -> None:
        from tokenizers import Tokenizer as Fast

        self._bytes = data
        self._sha256 = hashlib.sha256(data).hexdigest()
        self._tok = Fast.from_str(data.decode())
        self._tok.no_padding()
        self._tok.no_truncation()
        conf_path = self.path / "tokenizer_config.json"
        conf = json.loads(conf_path.read_text()) if conf_path.is_file() else {}
        special = {}
        for key in ("bos_token", "eos_token", "pad_token", "unk_token"):
            tok = conf.get(key)
            tok = tok.get("content") if isinstance(tok, dict) else tok
            special[key] = self._tok.token_to_id(tok) if tok else None
        spec = json.loads(data)
        self._added = {t["id"]: t for t in spec.get("added_tokens", [])}
        self._byte_level = "ByteLevel" in json.dumps(spec.get("decoder"))
        if special["eos_token"] is None:
            names = {t["content"]: i for i, t in self._added.items()}
            special["eos_token"] = next((names[n] for n in EOS_NAMES if n in names), None)
        self._special = special

    def __getstate__(self) -> dict:
        return {"path": self.path, "bytes": self._bytes}

    def __setstate__(self, state: dict) -> None:
        self.path = state["path"]
        self._load(state["bytes"])

    def __repr__(self) -> str:
        return f"HFTextTokenizer({str(self.path)!r}, vocab_size={self.vocab_size})"

    @property
    def vocab_size(self) -> int:
        """Ids in use, added tokens included (as `len(AutoTokenizer)`)."""
        return self._tok.get_vocab_size(with_added_tokens=True)

    def _id(self, key: str, fallback: int) -> int:
        i = self._special.get(key)
        return fallback if i is None else i

    @property
    def eos_id(self) -> int:
        return self._id("eos_token", -1)

    @property
    def bos_id(self) -> int:
        return self._id("bos_token", self.eos_id)

    @property
    def pad_id(self) -> int:
        return self._id("pad_token", self.eos_id)

    @property
    def unk_id(self) -> int:
        return self._id("unk_token", -1)

    @property
    def sha256(self) -> str:
        """Hex SHA-256 of tokenizer.json."""
        return self._sha256

    def encode(self, text: str) -> list[int]:
        """Ids of text, without bos/eos."""
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str], num_threads: int = 0) -> list[list[int]]:
        if num_threads > 0:
            os.environ.setdefault("RAYON_NUM_THREADS", str(num_threads))
        return [e.ids for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Iterable[int]) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=True)

    def id_to_piece(self, i: int) -> str:
        return self._tok.id_to_token(int(i))

    def token_bytes(self) -> list[int]:
        """UTF-8 bytes each id stands for: special tokens 0; byte-level pieces one byte per character; others
        their text (bits per byte in validation; see tokenizer.Tokenizer.token_bytes)."""
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

    def extension(self) -> dict | None:
        """The `tokenizer.extend` record of this directory, or None for an unextended tokenizer."""
        p = self.path / EXTENSION_FILE
        return json.loads(p.read_text()) if p.is_file() else None


def load_any(path: str | Path) -> Tokenizer | HFTextTokenizer:
    """The project's tokenizer when `path` holds one trained by tokenizer.train, else its HF tokenizer.json."""
    path = Path(path)
    if (path / MODEL_FILE).is_file():
        try:
            return Tokenizer(path / MODEL_FILE)
        except ValueError:
            if not (path / "tokenizer.json").is_file():
                raise
    if (path / "tokenizer.json").is_file():
        return HFTextTokenizer(path)
    return Tokenizer.from_dir(path)  # raises the "train one" hint
