"""Typed configuration of data sources and preparation (the `data/` Hydra group), and the root schemas of the
data_pipeline entry points (registered by `register_configs`)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from hydra.core.config_store import ConfigStore

FORMATS = ("json", "parquet", "csv", "text")


@dataclass
class FilterConfig:
    """Quality filters; a document failing one is rejected under that rule's name.

    Defaults are Gopher's (Rae et al. 2021) and FineWeb's (Penedo et al. 2024) published thresholds, adapted to
    Korean and measured on the shared corpora (BENCHMARKS.md, "Quality filters"), so a plain data config filters
    sensibly without tuning; 1 (or 0 for a minimum) disables a rule.
    """

    min_chars: int = 1
    """Shorter documents are rejected as `too_short` (after cleaning)."""
    max_chars: int = 5_000_000
    """Longer documents are rejected as `huge` (before cleaning, so a runaway file costs nothing)."""
    min_hangul_share: float = 0.3
    """For `language: ko` sources: Hangul syllables / letters below this are `low_hangul`; 0 disables."""
    max_symbol_share: float = 0.5
    """Share of non-letter, non-digit, non-space characters above this is `symbols`; 1 disables."""
    max_dup_line_share: float = 0.3
    """Share of lines that repeat an earlier line of the document, above this is `repeated_lines` (Gopher 0.3)."""
    max_top_ngram_share: float = 0.2
    """Share of characters covered by the most frequent word 3-gram, above this is `repeated_ngrams` (Gopher: 0.18
    for 3-grams; eojeol carry particles, so Korean 3-grams repeat less than English ones at the same share)."""
    ngram_min_words: int = 50
    """The word-repetition rules apply only to documents of at least this many words (short texts repeat by chance;
    Gopher's minimum document length)."""
    rules_min_chars: int = 200
    """Word-length, character-repetition and line rules judge only documents of at least this many characters:
    short texts (reviews, chat lines) have no line structure and repeat by nature."""
    min_mean_word_length: float = 2.0
    """Mean characters per word below this is `word_length`. Gopher: 3 for English words; a Korean eojeol is
    shorter in characters (median document 3.6 syllables on kowiki against 4.7-5.0 letters on English text, one
    syllable carrying about two letters' worth), and 3 would drop 1% of kowiki."""
    max_mean_word_length: float = 10.0
    """Mean characters per word above this is `word_length` (Gopher: 10): text without spaces; 0 disables."""
    max_char_repetition: float = 0.6
    """Share of character 10-grams repeating an earlier one, above this is `repeated_chars` (one syllable repeated,
    text without spaces where the word rules cannot see)."""
    max_word_repetition: float = 0.6
    """Share of word characters inside repeated word 5-grams, above this is `repeated_words`. Gopher: 0.15, which
    would drop over half of the court decisions: Korean legal prose repeats its formulas (median 0.21)."""
    min_line_punct_share: float = 0.08
    """Share of lines ending a sentence (punctuation, or a Korean sentence ending such as -다/-요) below this is
    `line_punctuation`; 0 disables. FineWeb: 0.12, which drops 5 of 27 hard-wrapped Gutenberg books."""
    max_short_line_share: float = 0.67
    """Share of lines shorter than `short_line_chars` above this is `short_lines` (FineWeb: 0.67)."""
    short_line_chars: int = 15
    """FineWeb: 30 characters; a Hangul syllable carries about two letters, and 30 would drop a third of the court
    decisions (short party and date lines)."""
    line_rules_min_lines: int = 3
    """The line-punctuation and short-line rules judge only documents with at least this many non-empty lines."""

    def __post_init__(self) -> None:
        if self.min_chars < 0 or self.max_chars < self.min_chars:
            raise ValueError(f"filters: need 0 <= min_chars <= max_chars, got {self.min_chars}, {self.max_chars}")
        for name in (
            "min_hangul_share",
            "max_symbol_share",
            "max_dup_line_share",
            "max_top_ngram_share",
            "max_char_repetition",
            "max_word_repetition",
            "min_line_punct_share",
            "max_short_line_share",
        ):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"filters.{name} must be in [0, 1], got {getattr(self, name)}")
        if self.min_mean_word_length < 0 or self.max_mean_word_length < 0:
            raise ValueError("filters.min_mean_word_length and max_mean_word_length must be >= 0")


@dataclass
class DedupConfig:
    """Exact (normalized-text hash) and near-duplicate (MinHash LSH) removal across all sources and files."""

    exact: bool = True
    near: bool = True
    threshold: float = 0.8
    """Estimated Jaccard similarity of character 5-gram shingles at or above which a document is a near duplicate."""
    num_perm: int = 64
    shingle: int = 5
    min_chars: int = 200
    """Near-dedup only documents at least this long: short texts (reviews, chat lines) share shingles by chance;
    exact dedup still covers them."""

    def __post_init__(self) -> None:
        if not 0.0 < self.threshold <= 1.0:
            raise ValueError(f"dedup.threshold must be in (0, 1], got {self.threshold}")
        if self.num_perm < 8 or self.shingle < 1:
            raise ValueError("dedup.num_perm must be >= 8 and dedup.shingle >= 1")


@dataclass
class SourceConfig:
    """One licensed source: where it is, how to read its text, and under which license."""

    paths: list[str] = field(default_factory=list)
    """Globs or local paths (relative to the working directory)."""
    format: str = "json"
    """json | parquet | csv | text (text: one document per file)."""
    text: str = "text"
    """A field name, or a template such as "{Q}\\n{A}"."""
    license: str | None = None
    """SPDX id or LicenseRef-...; required."""
    license_field: str | None = None
    """A per-document license field; where a row has one, it must be allowed too (else `license_not_allowed`)."""
    attribution: str = ""
    weight: float = 1.0
    """Mixture weight on the training split: 2.5 writes each document 2 or 3 times (2.5 on average), 0.3 keeps
    30% of documents (chosen by a seeded hash); validation is never reweighted."""
    max_tokens: int | None = None
    """Cap on this source's training tokens after weighting (documents past the cap are `capped`); null = none."""
    language: str = "ko"
    filters: dict = field(default_factory=dict)
    """Overrides of data.filters for this source, e.g. {min_chars: 10} for short reviews."""

    def __post_init__(self) -> None:
        if self.format not in FORMATS:
            raise ValueError(f"source format={self.format!r}: choose one of {FORMATS}")
        if self.weight < 0:
            raise ValueError(f"source weight must be >= 0, got {self.weight}")
        unknown = set(self.filters) - set(FilterConfig.__dataclass_fields__)
        if unknown:
            raise ValueError(f"source filters: unknown keys {sorted(unknown)}")


@dataclass
class DataConfig:
    """Sources, license policy, and preparation settings; `path` is the prepared output the trainer reads."""

    name: str = ""
    sources: dict[str, SourceConfig] = field(default_factory=dict)
    allowed_licenses: list[str] = field(default_factory=list)
    path: str | None = None
    """Directory written by `python -m data_pipeline.prepare` (shards + manifest.json)."""
    verify_hashes: bool = True
    """Before training, check every shard's sha256 against manifest.json (sizes are always checked); false for very
    large data, where every rank reading every shard first costs too much."""
    val_fraction: float = 0.02
    """Share of documents held out for validation, chosen by a hash of source and document index."""
    max_docs_per_source: int | None = None
    """Cap per source, for quick experiments and tests; null = all."""
    shard_tokens: int = 1 << 24
    """Tokens per shard file."""
    seed: int = 0
    filters: FilterConfig = field(default_factory=FilterConfig)
    dedup: DedupConfig = field(default_factory=DedupConfig)
    pii: bool = True
    """Replace e-mails, Korean phone and resident registration numbers, card numbers and IPs by typed placeholders."""
    write_text: bool = False
    """Also write the kept, cleaned documents as jsonl under OUT/text/ for audit."""
    num_workers: int = 0
    """Processes reading input files in parallel; 0 = one per CPU core. Output bytes do not depend on it."""
    num_shards: int = 1
    """Split the per-file work into this many parts, run independently (e.g. a SLURM array), then merged."""
    shard_index: int | None = None
    """With num_shards > 1: which part this run processes; null = all parts then merge (one job)."""
    engine: str = "local"
    """local (processes on this machine) | ray (Ray tasks on a cluster); output bytes do not depend on it."""
    ray_address: str | None = None
    """With engine=ray: null starts a Ray instance on this machine; `auto` joins the cluster started by `ray start`
    (launch/ray_slurm.sbatch); or host:port."""

    def __post_init__(self) -> None:
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError(f"data.val_fraction must be in [0, 1), got {self.val_fraction}")
        if self.shard_tokens <= 0:
            raise ValueError("data.shard_tokens must be positive")
        if self.num_shards < 1 or (self.shard_index is not None and not 0 <= self.shard_index < self.num_shards):
            raise ValueError(f"need 0 <= data.shard_index < data.num_shards, got {self.shard_index}/{self.num_shards}")
        if self.num_workers < 0:
            raise ValueError("data.num_workers must be >= 0")
        if self.engine not in ("local", "ray"):
            raise ValueError(f"data.engine={self.engine!r}: choose local or ray")

    def source_filters(self, name: str) -> FilterConfig:
        """data.filters with the source's overrides applied (validated)."""
        return FilterConfig(**{**asdict(self.filters), **self.sources[name].filters})


@dataclass
class TokenizerRef:
    """The tokenizer `prepare` encodes with: a trained directory, and the callable that loads it."""

    path: str | None = None
    """Directory of a trained tokenizer (`python -m tokenizer.train`)."""
    loader: str = "tokenizer.tokenizer:Tokenizer.from_dir"
    """`module:callable` taking `path` and returning a `TextTokenizer` (data_pipeline/text_tokenizer.py). A string
    resolved at run time: data_pipeline sits below tokenizer/ and never imports it."""


@dataclass
class PrepareRoot:
    """Root of configs/prepare.yaml: `python -m data_pipeline.prepare` (and `data_pipeline.merge`, `.bench`)."""

    data: DataConfig = field(default_factory=DataConfig)
    tokenizer: TokenizerRef = field(default_factory=TokenizerRef)
    out: str = "???"


@dataclass
class BomRoot:
    """Root of configs/bom.yaml: `python -m data_pipeline.bom path=PATH [json=true]`."""

    path: str | None = None
    """A prepared data directory or its manifest.json, a run directory, or a checkpoint tag directory."""
    json: bool = False
    """Print the summary as one JSON line instead of a table."""


def register_configs() -> None:
    """Register the data_pipeline entry points' root schemas so Hydra validates their configs against them."""
    cs = ConfigStore.instance()
    cs.store(name="prepare_schema", node=PrepareRoot)
    cs.store(name="bom_schema", node=BomRoot)


register_configs()
