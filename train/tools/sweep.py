"""Hydra multirun jobs as real multi-process runs: `python -m train.pretrain -m experiment=X a=1,2 b=3,4`.

Hydra's launcher (the local basic launcher, or submitit on SLURM) calls the entry point once per combination. In
that mode the entry point does not train in-process: it starts `torchrun` for the job, with the job's overrides,
`run.dir` set to the job's directory under the sweep directory, and the W&B group/tags of the sweep. A failed job
is recorded (exit status and its last error line) and the sweep goes on; every job appends to
SWEEP_DIR/sweep_summary.jsonl and prints the summary so far.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

from omegaconf import DictConfig

from model.accelerator import device_count

SWEEP_CONTROLLED = ("run.dir", "logging.wandb.group", "logging.wandb.tags")


def in_sweep() -> bool:
    """True in a Hydra multirun job that is not already one of torchrun's workers."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN and "LOCAL_RANK" not in os.environ


def job_command(overrides: list[str], job_dir: Path, group: str, nproc: int) -> list[str]:
    """The torchrun command (`launch.run`) of one sweep job; the sweep owns run.dir and the W&B group and tags."""
    kept = [o for o in overrides if o.split("=", 1)[0].lstrip("+~") not in SWEEP_CONTROLLED]
    tags = ",".join("'" + o.replace("'", "") + "'" for o in kept)
    return [
        sys.executable, "-m", "launch.run", "--standalone", f"--nproc_per_node={nproc}",
        "-m", "train.pretrain", *kept,
        f"run.dir='{job_dir}'", f"logging.wandb.group={group}", f"logging.wandb.tags=[{tags}]",
    ]  # fmt: skip


_NOISE = re.compile(
    r"^([WEI]\d{4} |\*+$|=+$|Traceback|File \"|Setting OMP|.*HYDRA_FULL_ERROR|.*error_file|.*FutureWarning)"
)


def last_error(log: str) -> str:
    """The job's own `error: ...` line if it printed one, else its first line that is not launcher noise."""
    lines = [line.strip() for line in log.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    if errors:
        return errors[-1]
    meaningful = [line for line in lines if not _NOISE.match(line) and "torch/distributed" not in line]
    return meaningful[0] if meaningful else (lines[-1] if lines else "no output")


def run_sweep_job(raw: DictConfig) -> dict:
    """Run this multirun job as a torchrun subprocess; record and print the outcome, never raise on failure."""
    from hydra.core.hydra_config import HydraConfig

    hc = HydraConfig.get()
    job_dir, sweep_dir = Path(hc.runtime.output_dir), Path(hc.sweep.dir)
    job_dir.mkdir(parents=True, exist_ok=True)
    nproc = raw.run.nproc_per_node or device_count() or 2
    group = raw.logging.wandb.group or sweep_dir.name
    overrides = list(hc.overrides.task)
    cmd = job_command(overrides, job_dir, group, nproc)
    print(f"[sweep] job {hc.job.num}: {' '.join(overrides)} -> {job_dir}", file=sys.stderr, flush=True)
    with open(job_dir / "train.log", "w") as log:
        proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, text=True)
    output = (job_dir / "train.log").read_text(errors="replace")
    record = {
        "job": hc.job.num,
        "overrides": overrides,
        "run_dir": str(job_dir),
        "status": "ok" if proc.returncode == 0 else "failed",
        "returncode": proc.returncode,
        "error": None if proc.returncode == 0 else last_error(output),
    }
    with open(sweep_dir / "sweep_summary.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")
    print_summary(sweep_dir)
    return record


def print_summary(sweep_dir: Path) -> None:
    rows = [json.loads(line) for line in (sweep_dir / "sweep_summary.jsonl").read_text().splitlines()]
    failed = [r for r in rows if r["status"] != "ok"]
    print(f"[sweep] {sweep_dir}: {len(rows) - len(failed)} ok, {len(failed)} failed so far", file=sys.stderr)
    for r in failed:
        print(f"[sweep]   job {r['job']} failed ({' '.join(r['overrides'])}): {r['error']}", file=sys.stderr)
