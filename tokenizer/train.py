"""Train a SentencePiece tokenizer on a data config's sources.

    python -m tokenizer.train tokenizer=ko64k data=shared_all out=DIR

Each source gets max_chars * weight / sum(weights) characters (tokenizer/sampling.py); every 20th document and the
sources in tokenizer.held_out_sources are kept out of training. DIR receives tokenizer.model plus the Hugging Face
files (tokenizer.json, tokenizer_config.json, special_tokens_map.json) and report.json: the settings, characters
per source, vocabulary share per script, and compression on the held-out text.
"""

from __future__ import annotations

import os
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

import hydra
import sentencepiece as spm
from omegaconf import DictConfig
from sentencepiece import sentencepiece_model_pb2 as spm_pb2

from data_pipeline.cli import to_object_strict, user_errors
from data_pipeline.config import DataConfig
from data_pipeline.sources import check_licenses
from tokenizer.config import TokenizerConfig, TokenizerTrainRoot
from tokenizer.hf import write_hf_files
from tokenizer.morph import MorphemeCutter
from tokenizer.nfc import add_nfc_normalizer
from tokenizer.report import build_report
from tokenizer.sampling import held_out_texts, plan, training_texts
from tokenizer.tokenizer import (
    BOS_ID,
    EOS_ID,
    EXTRA_SPECIAL_PIECES,
    MODEL_FILE,
    PAD_ID,
    SPECIAL_PIECES,
    UNK_ID,
    normalize,
)

MAX_TRAINING_LINES = 5_000_000
"""SentencePiece samples at most this many lines (shuffled), bounding trainer memory and time."""


def _log(msg: str) -> None:
    print(f"[tokenizer.train] {msg}", file=sys.stderr, flush=True)


def split_line(line: str, max_bytes: int) -> Iterator[str]:
    """Pieces of `line` of at most max_bytes UTF-8 bytes, cut on character boundaries; nothing is dropped."""
    data = line.encode("utf-8")
    if len(data) <= max_bytes:
        yield line
        return
    start = 0
    while start < len(data):
        end = min(start + max_bytes, len(data))
        if end < len(data):
            # Prefer cutting before a space, so no word is split in two; else step back off continuation bytes.
            space = data.rfind(b" ", start + max_bytes // 2, end)
            if space > start:
                end = space
            else:
                while end > start + 1 and data[end] & 0xC0 == 0x80:
                    end -= 1
                # max_bytes smaller than this character: take the whole character.
                while end < len(data) and data[end] & 0xC0 == 0x80:
                    end += 1
        yield data[start:end].decode("utf-8")
        start = end


def training_lines(texts: Iterable[str], max_chars: int, max_line_bytes: int, cutter=None) -> Iterator[str]:
    """NFC lines of the documents (empty lines skipped), until max_chars characters have been yielded.

    With a `tokenizer.morph.MorphemeCutter`, each line is further cut at Korean morpheme boundaries.
    """
    n_chars = 0
    for text in texts:
        # SentencePiece learns from lines; newlines themselves are encoded by byte fallback.
        lines = [piece for line in normalize(text).split("\n") if line for piece in split_line(line, max_line_bytes)]
        pieces = (p for cut in cutter.cuts(lines) for p in cut) if cutter is not None and lines else lines
        for piece in pieces:
            yield piece
            n_chars += len(piece)
            if n_chars >= max_chars:
                return


@contextmanager
def heartbeat(what: str, every_s: float = 15.0):
    """Log `what ... N s` every every_s seconds while the block runs (SentencePiece trains silently)."""
    done = threading.Event()
    start = time.perf_counter()

    def beat() -> None:
        while not done.wait(every_s):
            _log(f"{what} ... {time.perf_counter() - start:.0f} s")

    thread = threading.Thread(target=beat, daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()


def canonical_model_bytes(model_path: Path) -> bytes:
    """The model without the trainer's temporary paths and thread count, so equal training gives an equal sha256."""
    proto = spm_pb2.ModelProto()
    proto.ParseFromString(model_path.read_bytes())
    for name in ("input", "model_prefix", "num_threads"):
        proto.trainer_spec.ClearField(name)
    return proto.SerializeToString(deterministic=True)


def train_tokenizer(texts: Iterable[str], cfg: TokenizerConfig, out_dir: str | Path) -> Path:
    """Train on the first cfg.max_chars characters of `texts`; write tokenizer.model and the HF files to out_dir."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="tokenizer_train_") as tmp:
        corpus = Path(tmp) / "corpus.txt"
        n_chars = n_lines = 0
        next_report = 10_000_000  # sparse: the sampling progress bar shares stderr
        with open(corpus, "w", encoding="utf-8") as f:
            cutter = None
            if cfg.pre_segment == "kiwi":
                cutter = MorphemeCutter(cfg.num_threads)
            for line in training_lines(texts, cfg.max_chars, cfg.max_sentence_length, cutter):
                f.write(line + "\n")
                n_chars += len(line)
                n_lines += 1
                if n_chars >= next_report:
                    _log(f"collected {n_chars:,} chars ({n_lines:,} lines)")
                    next_report += 10_000_000
        if n_lines == 0:
            raise ValueError("no training text: the sources yielded no non-empty lines")
        _log(f"collected {n_chars:,} chars in {n_lines:,} lines (max_chars={cfg.max_chars:,}); training...")

        spm.set_random_generator_seed(cfg.seed)
        start = time.perf_counter()
        with heartbeat(f"training {cfg.model_type} vocab {cfg.vocab_size}"):
            _train_sentencepiece(corpus, Path(tmp) / "tokenizer", cfg)
        _log(f"trained {cfg.model_type} vocab {cfg.vocab_size} in {time.perf_counter() - start:.1f} s")
        # Replace atomically, so a reader never sees a half-written model.
        tmp_model = out / (MODEL_FILE + ".tmp")
        # NFC compiled into the model's normalizer: raw sentencepiece then encodes NFD text as training did.
        tmp_model.write_bytes(add_nfc_normalizer(canonical_model_bytes(Path(tmp) / "tokenizer.model")))
        os.replace(tmp_model, out / MODEL_FILE)
    write_hf_files(out / MODEL_FILE, out)
    _log(f"wrote {out}")
    return out


def _train_sentencepiece(corpus: Path, prefix: Path, cfg: TokenizerConfig) -> None:
    spm.SentencePieceTrainer.train(
        input=str(corpus),
        model_prefix=str(prefix),
        model_type=cfg.model_type,
        vocab_size=cfg.vocab_size,
        character_coverage=cfg.character_coverage,
        byte_fallback=cfg.byte_fallback,
        split_digits=cfg.split_digits,
        # We apply NFC ourselves (and compile it into the model afterwards, tokenizer/nfc.py) and keep every
        # whitespace, so decode(encode(x)) == NFC(x).
        normalization_rule_name="identity",
        add_dummy_prefix=False,
        remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True,
        pad_id=PAD_ID,
        bos_id=BOS_ID,
        eos_id=EOS_ID,
        unk_id=UNK_ID,
        pad_piece=SPECIAL_PIECES[PAD_ID],
        bos_piece=SPECIAL_PIECES[BOS_ID],
        eos_piece=SPECIAL_PIECES[EOS_ID],
        unk_piece=SPECIAL_PIECES[UNK_ID],
        # FIM, chat and reserved pieces at fixed ids 4..63 (tokenizer.tokenizer.SPECIAL_IDS).
        user_defined_symbols=list(EXTRA_SPECIAL_PIECES),
        max_sentencepiece_length=cfg.max_piece_length,
        split_by_whitespace=cfg.split_by_whitespace,
        split_by_unicode_script=cfg.split_by_script,
        max_sentence_length=cfg.max_sentence_length,
        input_sentence_size=MAX_TRAINING_LINES,
        shuffle_input_sentence=True,
        num_threads=cfg.num_threads or os.cpu_count() or 1,
        train_extremely_large_corpus=False,
        minloglevel=0 if cfg.verbose else 2,
    )


@hydra.main(config_path="../configs", config_name="tokenizer_train", version_base="1.3")
def main(cfg: DictConfig) -> None:
    with user_errors():
        root: TokenizerTrainRoot = to_object_strict(cfg)  # builds the dataclasses, running their checks
        train_from_data(root.tokenizer, root.data, root.out)


def train_from_data(cfg: TokenizerConfig, data: DataConfig, out_dir: str | Path, *, progress: bool = True) -> dict:
    """Train on the data config's sources (sampled by weight, held-out text kept out); write report.json too."""
    check_licenses(data)
    split = plan(data, cfg.max_chars, cfg.held_out_sources)
    _log(f"character budget per source: {split.budgets}; never trained on: {split.held_out_sources or 'none'}")
    start = time.perf_counter()
    rejected: dict[str, Counter] = {}  # per source and reason, as prepare counts them
    out = train_tokenizer(training_texts(data, split, progress=progress, rejected=rejected), cfg, out_dir)
    seconds = time.perf_counter() - start
    held_out = held_out_texts(data, split, cfg.eval_max_chars, rejected) if cfg.eval_max_chars > 0 else {}
    languages = {name: src.language for name, src in data.sources.items()}
    report = build_report(out, cfg, data.name, split.budgets, held_out, languages, seconds, rejected)
    for name, counts in rejected.items():
        if counts:
            reasons = ", ".join(f"{r}: {n:,}" for r, n in sorted(counts.items()))
            _log(f"{name}: skipped {sum(counts.values()):,} rejected rows ({reasons})")
    for name, m in report["held_out"].items():
        _log(
            f"held out {name}: {m['chars_per_token']:.3f} chars/token, round trip {'ok' if m['round_trip'] else 'FAIL'}"
        )
    _log(f"wrote {out / 'report.json'}")
    return report


if __name__ == "__main__":
    main()
