"""Typed configuration of a tokenizer (the `tokenizer/` Hydra group)."""

from __future__ import annotations

from dataclasses import dataclass

MODEL_TYPES = ("bpe", "unigram")


@dataclass
class TokenizerConfig:
    """How to train a SentencePiece tokenizer, and where a trained one lives."""

    name: str = "ko8k"
    path: str | None = None
    """Directory of a trained tokenizer (tokenizer.model, tokenizer.json, ...); used by prepare and train."""
    vocab_size: int = 8192
    """Total entries including special and byte-fallback tokens; a multiple of 128."""
    model_type: str = "bpe"
    character_coverage: float = 0.9995
    byte_fallback: bool = True
    split_digits: bool = True
    max_chars: int = 20_000_000
    """Characters of source text sampled for training (across sources, by weight)."""
    max_sentence_length: int = 8192
    """Longest training line in bytes; longer lines are split, not dropped."""
    num_threads: int = 0
    """SentencePiece trainer threads; 0 = all cores."""
    seed: int = 0
    """Seed of SentencePiece's random generator (sampling of training lines)."""
    verbose: bool = False
    """Show SentencePiece's own (very long) training log."""

    def __post_init__(self) -> None:
        if self.model_type not in MODEL_TYPES:
            raise ValueError(f"tokenizer.model_type={self.model_type!r}: choose one of {MODEL_TYPES}")
        if self.vocab_size % 128 or self.vocab_size < 512:
            raise ValueError(f"tokenizer.vocab_size={self.vocab_size} must be a multiple of 128 and >= 512")
