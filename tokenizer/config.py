"""Typed configuration of a tokenizer (the `tokenizer/` Hydra group), and the root schemas of the tokenizer entry
points (registered by `register_configs`)."""

from __future__ import annotations

from dataclasses import dataclass, field

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

from data_pipeline.config import DataConfig

MODEL_TYPES = ("bpe", "unigram")
PRE_SEGMENTS = ("none", "kiwi")


@dataclass
class TokenizerConfig:
    """How to train a SentencePiece tokenizer, and where a trained one lives."""

    name: str = "ko8k"
    path: str | None = None
    """Directory of a trained tokenizer (tokenizer.model, tokenizer.json, ...); used by prepare and train."""
    loader: str = "tokenizer.tokenizer:Tokenizer.from_dir"
    """`module:callable` loading `path` (data_pipeline/text_tokenizer.py's TextTokenizer); e.g.
    `tokenizer.hf_tokenizer:load_any` for a Hugging Face tokenizer.json (ablations)."""
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
    max_piece_length: int = 16
    """Longest vocabulary entry in characters."""
    split_by_whitespace: bool = True
    """Pieces end at whitespace (false: frequent multi-word pieces such as "▁수 있다" may be learned)."""
    split_by_script: bool = True
    """Pieces end where the Unicode script changes (false: pieces such as "다." or "(주)" may be learned)."""
    pre_segment: str = "none"
    """none | kiwi: cut Korean training text at morpheme boundaries (kiwipiepy) so no piece spans two morphemes;
    encoding never needs the analyzer."""
    held_out_sources: list[str] = field(default_factory=list)
    """Sources of the data config never trained on, only evaluated in report.json ("unseen" domains)."""
    eval_max_chars: int = 1_000_000
    """Characters of held-out text per source evaluated for report.json; 0 = no report."""

    def __post_init__(self) -> None:
        if self.model_type not in MODEL_TYPES:
            raise ValueError(f"tokenizer.model_type={self.model_type!r}: choose one of {MODEL_TYPES}")
        if self.vocab_size % 128 or self.vocab_size < 512:
            raise ValueError(f"tokenizer.vocab_size={self.vocab_size} must be a multiple of 128 and >= 512")
        if self.pre_segment not in PRE_SEGMENTS:
            raise ValueError(f"tokenizer.pre_segment={self.pre_segment!r}: choose one of {PRE_SEGMENTS}")


@dataclass
class TokenizerTrainRoot:
    """Root schema of configs/tokenizer_train.yaml."""

    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    data: DataConfig = field(default_factory=DataConfig)
    out: str = MISSING
    """Output directory of the trained tokenizer."""


DEFAULT_REFERENCES = [
    "../shared/reference_tokenizers/polyglot-ko",
    "pkg:mistral_common/data/tekken_240911.json",
    "pkg:mistral_common/data/mistral_instruct_tokenizer_240323.model.v3",
]


@dataclass
class TokenizerEvalConfig:
    """What `python -m tokenizer.evaluate` measures."""

    files: list[str] = field(default_factory=list)
    """Text files (.txt: documents split at blank lines; .jsonl / .parquet: a "text" field per row)."""
    references: list[str] = field(default_factory=lambda: list(DEFAULT_REFERENCES))
    """Reference tokenizers to measure next to ours (missing ones are skipped)."""
    max_chars: int = 2_000_000
    """Characters read per file (whole documents, the last one cut)."""
    speed: bool = True
    """Measure encode throughput (one thread, all cores)."""
    out: str | None = None
    """Also write the JSON result here."""


@dataclass
class TokenizerEvalRoot:
    """Root schema of configs/tokenizer_evaluate.yaml."""

    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    eval: TokenizerEvalConfig = field(default_factory=TokenizerEvalConfig)


def register_configs() -> None:
    """Register the tokenizer entry points' root schemas so Hydra validates their configs against them."""
    cs = ConfigStore.instance()
    cs.store(name="tokenizer_train_schema", node=TokenizerTrainRoot)
    cs.store(name="tokenizer_evaluate_schema", node=TokenizerEvalRoot)


register_configs()
