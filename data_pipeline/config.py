"""Typed configuration of data sources and preparation (the `data/` Hydra group)."""

from __future__ import annotations

from dataclasses import dataclass, field

FORMATS = ("json", "parquet", "csv", "text")


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
    attribution: str = ""
    weight: float = 1.0
    language: str = "ko"

    def __post_init__(self) -> None:
        if self.format not in FORMATS:
            raise ValueError(f"source format={self.format!r}: choose one of {FORMATS}")
        if self.weight < 0:
            raise ValueError(f"source weight must be >= 0, got {self.weight}")


@dataclass
class DataConfig:
    """Sources, license policy, and preparation settings; `path` is the prepared output the trainer reads."""

    name: str = ""
    sources: dict[str, SourceConfig] = field(default_factory=dict)
    allowed_licenses: list[str] = field(default_factory=list)
    path: str | None = None
    """Directory written by `python -m data_pipeline.prepare` (shards + manifest.json)."""
    val_fraction: float = 0.02
    """Share of documents held out for validation, chosen by a hash of source and document index."""
    max_docs_per_source: int | None = None
    """Cap per source, for quick experiments and tests; null = all."""
    shard_tokens: int = 1 << 24
    """Tokens per shard file."""
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError(f"data.val_fraction must be in [0, 1), got {self.val_fraction}")
        if self.shard_tokens <= 0:
            raise ValueError("data.shard_tokens must be positive")
