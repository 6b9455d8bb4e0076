"""Reading a finished run directory: its resolved config and its tokenizer."""

from __future__ import annotations

from pathlib import Path

from omegaconf import OmegaConf

from data_pipeline.config import TokenizerRef
from data_pipeline.text_tokenizer import load_tokenizer


def run_config(run_dir: str | Path) -> dict:
    """RUN_DIR/config.yaml as a plain dict, with a clear error when run.dir is not a run."""
    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: run.dir must be a directory written by train.pretrain")
    return OmegaConf.to_container(OmegaConf.load(path), resolve=True)


def run_tokenizer(run_dir: str | Path, meta: dict):
    """The run's tokenizer, refusing one whose hash differs from what the checkpoint was trained with."""

    ref = run_config(run_dir)["tokenizer"]
    path = ref["path"]
    tok = load_tokenizer(TokenizerRef(path, ref.get("loader") or TokenizerRef.loader))
    if tok.sha256 != meta["tokenizer_sha256"]:
        raise ValueError(
            f"tokenizer at {path} (sha256 {tok.sha256[:12]}…) is not the one this run was trained with "
            f"({meta['tokenizer_sha256'][:12]}…): restore it, or fix tokenizer.path in {run_dir}/config.yaml"
        )
    return tok, Path(path)
