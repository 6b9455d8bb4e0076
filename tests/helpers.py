"""Helpers shared by tests: real subprocess runs of the entry points, and the shipped sample data config."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SAMPLES = REPO / "data" / "samples"


def run_module(*args: str, cwd: Path = REPO, timeout: int = 600, env: dict | None = None, check: bool = True):
    """Run `python -m ...` (or torchrun when args[0] == 'torchrun') as a real process; returns CompletedProcess."""
    base = [sys.executable, "-m", "torch.distributed.run"] if args[0] == "torchrun" else [sys.executable, "-m"]
    cmd = base + list(args[1:] if args[0] == "torchrun" else args)
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "WANDB_SILENT": "true", **(env or {})}
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=full_env)
    if check and proc.returncode != 0:
        raise AssertionError(
            f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
        )
    return proc


def sample_data_config(**overrides):
    """The shipped ko_sample data config as a DataConfig, paths made absolute so tests may run anywhere."""
    from omegaconf import OmegaConf

    from data_pipeline.config import DataConfig

    raw = OmegaConf.load(REPO / "configs" / "data" / "ko_sample.yaml")
    for src in raw.sources.values():
        src.paths = [str(REPO / p) for p in src.paths]
    cfg = OmegaConf.merge(OmegaConf.structured(DataConfig), raw, overrides)
    return OmegaConf.to_object(cfg)


STEPS = 10


def train_args(tok: Path, data: Path, run_dir: Path, *extra: str) -> list[str]:
    """Overrides of a 10-step, 2-rank run of the nano model on the session's tiny data."""
    return [
        "model=nano",
        f"tokenizer.path={tok}",
        f"data.path={data}",
        f"run.dir={run_dir}",
        "train.seq_len=64",
        "train.global_batch_tokens=512",
        "train.micro_batch_size=2",
        f"train.max_steps={STEPS}",
        "train.eval_every=5",
        "train.eval_sequences=8",
        "optim.warmup_steps=2",
        "optim.lr=1e-3",
        "checkpoint.every_steps=5",
        "logging.wandb.mode=disabled",
        "logging.progress=false",
        *extra,
    ]


def torchrun_pretrain(*args: str, check: bool = True):
    """`torchrun --nproc_per_node=2 -m train.pretrain ARGS` on CPU (gloo), as a real job."""
    return run_module("torchrun", "--standalone", "--nproc_per_node=2", "-m", "train.pretrain", *args, check=check)


def stopped_at(run: Path, dest: Path, step: int) -> Path:
    """A copy of `run` as it stood after its step-`step` checkpoint: later checkpoints, later metrics rows and W&B
    files left out, `latest` pointing at that checkpoint."""

    def later(_dir: str, names: list[str]) -> list[str]:
        return [n for n in names if n == "wandb" or (re.fullmatch(r"step_\d{8}", n) and int(n[5:]) > step)]

    shutil.copytree(run, dest, ignore=later)
    (dest / "checkpoints" / "latest").write_text(f"step_{step:08d}")
    kept = [line for line in (dest / "metrics.jsonl").read_text().splitlines() if json.loads(line)["step"] <= step]
    (dest / "metrics.jsonl").write_text("".join(line + "\n" for line in kept))
    return dest


def losses(run_dir: Path) -> dict[int, float]:
    """Training loss per step; a step logged twice (before and after a resume) keeps its last value."""
    out = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        if "loss" in row:
            out[row["step"]] = row["loss"]
    return out


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny shapes: one intra-op thread is ~100x faster than two spinning on a shared, loaded 2-core machine.
    Autouse wherever it is imported (tests/model/conftest.py, tests/model/test_hf_deepseek.py)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
