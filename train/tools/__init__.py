"""Tools over runs: benchmarks and suites, reports, sweeps, evaluation, export, lm-evaluation-harness, the demo
summary. Their entry points are the thin `train.<name>` modules."""

from pathlib import Path

CONFIGS = str(Path(__file__).resolve().parents[2] / "configs")
"""The repository's configs/, as an absolute path: the tools' Hydra mains live in imported modules, for which Hydra
would otherwise look for a `configs` Python package."""
