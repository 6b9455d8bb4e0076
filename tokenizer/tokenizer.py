"""The project's tokenizer: a SentencePiece model behind NFC normalization, with fixed special-token ids."""

from __future__ import annotations

import hashlib
import os
import unicodedata
from collections.abc import Iterable
from pathlib import Path

import sentencepiece as spm

MODEL_FILE = "tokenizer.model"
PAD_ID, BOS_ID, EOS_ID, UNK_ID = 0, 1, 2, 3
SPECIAL_PIECES = {PAD_ID: "<pad>", BOS_ID: "<s>", EOS_ID: "</s>", UNK_ID: "<unk>"}

FIM_PREFIX, FIM_MIDDLE, FIM_SUFFIX, FIM_PAD = "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>"
TURN_START, TURN_END = "<|im_start|>", "<|im_end|>"
ROLES = ("<|system|>", "<|user|>", "<|assistant|>", "<|tool|>")
N_RESERVED = 50
EXTRA_SPECIAL_PIECES: tuple[str, ...] = (
    (FIM_PREFIX, FIM_MIDDLE, FIM_SUFFIX, FIM_PAD, TURN_START, TURN_END)
    + ROLES
    + tuple(f"<|reserved_{i}|>" for i in range(N_RESERVED))
)
"""Ids 4..63, in this order (FIM 4-7, chat turn 8-9, roles 10-13, reserved 14-63): SentencePiece user-defined
symbols, so each is one id and decodes to its own text; byte pieces follow at 64..319."""
SPECIAL_IDS: dict[str, int] = {
    **{piece: i for i, piece in SPECIAL_PIECES.items()},
    **{piece: len(SPECIAL_PIECES) + k for k, piece in enumerate(EXTRA_SPECIAL_PIECES)},
}
"""Every special piece and its fixed id."""


def normalize(text: str) -> str:
    """Unicode NFC, the only normalization we apply; SentencePiece itself runs with the identity rule."""
    # NFD input (common from macOS file names and some web text) would otherwise tokenize Hangul as jamo.
    return unicodedata.normalize("NFC", text)


class Tokenizer:
    """A trained tokenizer.model; `encode` NFC-normalizes and adds no bos/eos, so decode(encode(x)) == NFC(x).

    Picklable (the model bytes travel), so data-pipeline worker processes can receive one.
    """

    def __init__(self, model_path: str | Path) -> None:
        self.model_path = Path(model_path)
        self._load(self.model_path.read_bytes())

    def _load(self, model_bytes: bytes) -> None:
        self._model_bytes = model_bytes
        self._sha256 = hashlib.sha256(model_bytes).hexdigest()
        self._sp = spm.SentencePieceProcessor(model_proto=model_bytes)
        found = {i: self._sp.id_to_piece(i) for i in SPECIAL_PIECES}
        if found != SPECIAL_PIECES or self._sp.unk_id() != UNK_ID:
            raise ValueError(
                f"{self.model_path}: special pieces are {found}, expected {SPECIAL_PIECES}; "
                "retrain it with python -m tokenizer.train"
            )

    @classmethod
    def from_dir(cls, path: str | Path) -> Tokenizer:
        """Load `path/tokenizer.model`, with a hint on how to train one when it is missing."""
        model_path = Path(path) / MODEL_FILE
        if not model_path.is_file():
            raise FileNotFoundError(
                f"no {MODEL_FILE} in tokenizer directory {str(path)!r}; train one with "
                f"python -m tokenizer.train tokenizer=ko8k data=ko_sample out={path}"
            )
        return cls(model_path)

    def __getstate__(self) -> dict:
        return {"model_path": self.model_path, "model_bytes": self._model_bytes}

    def __setstate__(self, state: dict) -> None:
        self.model_path = state["model_path"]
        self._load(state["model_bytes"])

    def __repr__(self) -> str:
        return f"Tokenizer({str(self.model_path)!r}, vocab_size={self.vocab_size}, sha256={self.sha256[:12]}...)"

    @property
    def vocab_size(self) -> int:
        return self._sp.get_piece_size()

    @property
    def pad_id(self) -> int:
        return PAD_ID

    @property
    def bos_id(self) -> int:
        return BOS_ID

    @property
    def eos_id(self) -> int:
        return EOS_ID

    @property
    def unk_id(self) -> int:
        return UNK_ID

    @property
    def sha256(self) -> str:
        """Hex SHA-256 of tokenizer.model: the identity that prepared data and runs record."""
        return self._sha256

    def special_id(self, piece: str) -> int:
        """The fixed id of a special piece such as "<|fim_prefix|>" (see SPECIAL_IDS); refuses older models."""
        i = SPECIAL_IDS[piece]
        if self._sp.id_to_piece(i) != piece:
            raise ValueError(
                f"{self.model_path}: has no {piece!r} at id {i}; retrain it with python -m tokenizer.train"
            )
        return i

    def encode(self, text: str) -> list[int]:
        """Ids of NFC(text), without bos/eos."""
        return self._sp.encode(normalize(text))

    def encode_batch(self, texts: list[str], num_threads: int = 0) -> list[list[int]]:
        """`encode` of each text, on SentencePiece's thread pool; num_threads 0 = all cores, 1 = this thread."""
        threads = num_threads if num_threads > 0 else os.cpu_count() or 1
        if threads == 1:
            # A batch call starts a new thread even for one; in a process with many threads (a Ray worker) each new
            # thread can get a fresh malloc arena that keeps the batch's freed memory: +29 MB per large file there.
            return [self._sp.encode(normalize(t)) for t in texts]
        return self._sp.encode([normalize(t) for t in texts], num_threads=threads)

    def decode(self, ids: Iterable[int]) -> str:
        """Text of ids; control pieces (pad, bos, eos) decode to nothing."""
        return self._sp.decode([int(i) for i in ids])

    def token_bytes(self) -> list[int]:
        """UTF-8 bytes each id adds to `decode`'s text: control pieces 0, byte pieces 1, others their text with
        `▁` read as a space. Decoding concatenates pieces (no dummy prefix is stripped), so for any ids
        sum(token_bytes()[i] for i in ids) == len(decode(ids).encode()) (bits per byte in validation)."""
        out = []
        for i in range(self.vocab_size):
            if self._sp.is_control(i):
                out.append(0)
            elif self._sp.is_byte(i):
                out.append(1)
            elif self._sp.is_unknown(i):
                out.append(len(self._sp.decode([i]).encode("utf-8")))
            else:
                out.append(len(self._sp.id_to_piece(i).replace("\u2581", " ").encode("utf-8")))
        return out

    def id_to_piece(self, i: int) -> str:
        """The vocabulary entry of an id (for inspection)."""
        return self._sp.id_to_piece(int(i))
