"""Every shipped config composes against its schema and converts to typed dataclasses."""

from __future__ import annotations

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

import data_pipeline.config  # noqa: F401  registers prepare/bom schemas
import launch.config  # noqa: F401  registers plan_schema
import tokenizer.config  # noqa: F401  registers tokenizer_train/tokenizer_evaluate schemas
import train.config  # noqa: F401  registers train/evaluate/export schemas
import train.tools.bench  # noqa: F401  registers bench_schema
import train.tools.lm_eval  # noqa: F401  registers lm_eval_schema
import train.tools.report  # noqa: F401  registers report_schema
from tests.helpers import REPO

CONFIGS = REPO / "configs"


def names(group: str) -> list[str]:
    return sorted(p.stem for p in (CONFIGS / group).glob("*.yaml"))


def compose_obj(config: str, overrides: list[str]):
    with initialize_config_dir(str(CONFIGS), version_base="1.3"):
        cfg = compose(config, overrides=overrides)
    return OmegaConf.to_object(cfg)


@pytest.mark.parametrize("experiment", names("experiment"))
def test_experiments_compose(experiment):
    cfg = compose_obj("train", [f"experiment={experiment}", "run.dir=/tmp/x"])
    assert cfg.run.dir


GROUPS = ("model", "tokenizer", "data", "optim", "deepspeed", "logging")


@pytest.mark.parametrize("group,name", [(g, n) for g in GROUPS for n in names(g)])
def test_group_options_compose(group, name):
    cfg = compose_obj("train", [f"{group}={name}", "run.dir=/tmp/x"])
    assert getattr(cfg, group) is not None


@pytest.mark.parametrize(
    "config,overrides",
    [
        ("prepare", ["out=/tmp/x"]),
        ("merge", ["out=/tmp/x"]),
        ("summary", []),
        ("bom", ["path=/tmp/x"]),
        ("report", ["runs=[/tmp/a,/tmp/b]", "out=/tmp/x"]),
        ("tokenizer_train", ["out=/tmp/x"]),
        ("tokenizer_train", ["tokenizer=ko64k", "data=shared_all", "out=/tmp/x"]),
        ("tokenizer_evaluate", ["tokenizer.path=/tmp/x", "eval.files=[a.txt]"]),
        ("bench", []),
        ("evaluate", ["run.dir=/tmp/x", "eval.text_files=[a.txt]"]),
        ("export", ["run.dir=/tmp/x", "out=/tmp/y"]),
        ("lm_eval", ["run.dir=/tmp/x"]),
        ("plan", ["model=deepseek_tiny", "gpus=4"]),
    ],
)
def test_entry_point_roots_compose(config, overrides):
    compose_obj(config, overrides)


def test_every_yaml_is_covered():
    covered = {
        "train",
        "prepare",
        "merge",
        "summary",
        "bom",
        "report",
        "tokenizer_train",
        "tokenizer_evaluate",
        "bench",
        "evaluate",
        "export",
        "lm_eval",
        "plan",
    }
    top = {p.stem for p in CONFIGS.glob("*.yaml")}
    assert top == covered, top ^ covered
    # Every file below the roots is an option one of the parametrized compose tests picks up (bench_suite's in
    # tests/train/tools/test_bench_suite.py, cluster's in tests/launch/test_perf.py); a new folder, or a file nested
    # deeper than `names` globs, fails here.
    folders = {p.parent.relative_to(CONFIGS).as_posix() for p in CONFIGS.rglob("*.yaml") if p.parent != CONFIGS}
    assert folders == {"experiment", *GROUPS, "bench_suite", "cluster"}, folders


def test_slurm_sweep_launcher_composes():
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    with initialize_config_dir(str(CONFIGS), version_base="1.3"):
        cfg = compose(
            "train",
            overrides=["experiment=ko_tiny", "hydra/launcher=submitit_slurm", "hydra.launcher.partition=gpu"],
            return_hydra_config=True,
        )
    assert cfg.hydra.launcher.partition == "gpu" and "SlurmLauncher" in cfg.hydra.launcher._target_
