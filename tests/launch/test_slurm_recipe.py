"""launch/slurm.sbatch takes its node count from a recipe written by `launch.plan out=`."""

from __future__ import annotations

import os
import subprocess

import pytest

from tests.helpers import REPO

pytestmark = pytest.mark.slow  # each test runs launch/slurm.sbatch in a bash subprocess (a few seconds)

RECIPE = "llama_1b_8xh100"  # configs/experiment/, header `# slurm: nodes=1 gpus_per_node=8`


def _run(tmp_path, env_extra: dict, *args: str) -> subprocess.CompletedProcess:
    stub = tmp_path / "bin"
    stub.mkdir(exist_ok=True)
    (stub / "sbatch").write_text('#!/bin/sh\necho "sbatch $*"\n')  # no SLURM here: record what would be submitted
    (stub / "sbatch").chmod(0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update(PATH=f"{stub}:{env['PATH']}", **env_extra)
    return subprocess.run(["bash", "launch/slurm.sbatch", *args], cwd=REPO, env=env, capture_output=True, text=True)


def test_outside_a_job_submits_itself_with_the_recipes_node_count(tmp_path):
    header = next(
        line
        for line in (REPO / "configs/experiment" / f"{RECIPE}.yaml").read_text().splitlines()
        if line.startswith("# slurm: ")
    )
    nodes = header.split("nodes=")[1].split()[0]
    gpus = header.split("gpus_per_node=")[1].split()[0]
    proc = _run(tmp_path, {}, f"experiment={RECIPE}", "run.dir=/shared/x")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == [
        "sbatch",
        f"--nodes={nodes}",
        f"--gpus-per-node={gpus}",
        "launch/slurm.sbatch",
        f"experiment={RECIPE}",
        "run.dir=/shared/x",
    ]


def test_inside_a_job_of_another_size_it_refuses(tmp_path):
    proc = _run(tmp_path, {"SLURM_JOB_ID": "7", "SLURM_NNODES": "3"}, f"experiment={RECIPE}")
    assert proc.returncode == 2
    assert "planned for" in proc.stderr and "this job has 3" in proc.stderr


def test_outside_a_job_without_a_planned_recipe_it_explains(tmp_path):
    proc = _run(tmp_path, {}, "experiment=ko_tiny")
    assert proc.returncode == 2 and proc.stderr.startswith("error: not inside a SLURM job")
