"""`python -m train.lm_eval run.dir=DIR tasks=[ko_nsmc_sentiment]`: lm-evaluation-harness on a run's export, offline.

Exports the run's latest checkpoint to RUN_DIR/hf (unless present and current), evaluates it with
lm-evaluation-harness through transformers, writes RUN_DIR/lm_eval.json ({task: {"score", "metric", "metrics",
"n"}}), which `train.report` and the model card show, and adds the scores to the run's W&B run
(`lm_eval/TASK/METRIC`). Tasks shipped with the repo (train/lm_eval_tasks/, data under data/eval/) are found by
name: ko_nsmc_sentiment, and KoBEST (`kobest` = kobest_boolq, kobest_copa, kobest_hellaswag, kobest_sentineg,
kobest_wic: the harness's own definitions read from data/eval/kobest/, no network); any harness task whose data is
available locally works too.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path

import hydra
from omegaconf import DictConfig

from data_pipeline.cli import to_object_strict, user_errors
from model.accelerator import device_type
from train.callbacks.downstream import shipped_task_names, shipped_tasks
from train.checkpoint import latest_tag
from train.config import LmEvalConfig
from train.tools import CONFIGS
from train.tools.export import export
from train.tools.run_dir import run_config


def ensure_export(run_dir: Path) -> Path:
    """RUN_DIR/hf, re-exported when it is missing or older than the latest checkpoint."""

    hf = run_dir / "hf"
    tag = latest_tag(run_dir / "checkpoints")
    info = hf / "hangang_export.json"
    if not info.is_file() or json.loads(info.read_text()).get("tag") != tag:
        export(str(run_dir), str(hf))
    return hf


def run_lm_eval(cfg: LmEvalConfig) -> dict:
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    run_dir = Path(cfg.run.dir)
    if not (run_dir / "config.yaml").is_file():
        raise FileNotFoundError(f"{run_dir} is not a run directory (no config.yaml): fix run.dir")
    hf = ensure_export(run_dir)
    device = device_type() if cfg.device == "auto" else cfg.device
    with tempfile.TemporaryDirectory() as tmp:
        manager = TaskManager(include_path=str(shipped_tasks(Path(tmp))))
        unknown = [t for t in cfg.tasks if t not in manager.all_tasks]
        if unknown:
            raise ValueError(f"unknown lm-eval task(s) {unknown}: shipped tasks are {shipped_task_names()}")
        results = simple_evaluate(
            model="hf",
            model_args=f"pretrained={hf},dtype=float32",
            tasks=list(cfg.tasks),
            num_fewshot=cfg.num_fewshot,
            limit=cfg.limit,
            batch_size=cfg.batch_size,
            device=device,
            task_manager=manager,
            random_seed=0,
            numpy_random_seed=0,
            torch_random_seed=0,
        )
    out = {}
    n_samples = results["n-samples"]
    subtasks = results.get("group_subtasks", {})
    for task, metrics in results["results"].items():
        clean = {
            k.split(",")[0]: v
            for k, v in metrics.items()
            if isinstance(v, (int, float)) and "stderr" not in k and k != "sample_len"
        }
        main = "acc" if "acc" in clean else next(iter(clean), None)
        out[task] = {
            "score": clean.get(main),
            "metric": main,
            "metrics": clean,
            # A group (kobest) has no count of its own: the sum of its tasks'.
            "n": n_samples[task]["effective"]
            if task in n_samples
            else sum(n_samples[t]["effective"] for t in subtasks.get(task, []) if t in n_samples),
        }
    (run_dir / "lm_eval.json").write_text(json.dumps(out, indent=2, ensure_ascii=False))
    log_to_wandb(run_dir, out)
    return out


def log_to_wandb(run_dir: Path, out: dict) -> None:
    """Add the scores to the run's own W&B run (same id, the run's mode; offline runs land in RUN_DIR/wandb/) as
    summary values `lm_eval/TASK/METRIC`; nothing when the run had W&B disabled."""
    w = run_config(run_dir).get("logging", {}).get("wandb", {})
    id_file = run_dir / "wandb_run_id.txt"
    if w.get("mode", "disabled") == "disabled" or not id_file.is_file():
        return
    import wandb

    os.environ.setdefault("WANDB_SILENT", "true")
    run = wandb.init(project=w.get("project"), entity=w.get("entity"), mode=w["mode"], dir=str(run_dir),
                     id=id_file.read_text().strip(), resume="allow")  # fmt: skip
    for task, r in out.items():
        for metric, value in r["metrics"].items():
            run.summary[f"lm_eval/{task}/{metric}"] = value
    run.finish()


@hydra.main(config_path=CONFIGS, config_name="lm_eval", version_base="1.3")
def main(raw: DictConfig) -> None:
    with user_errors():
        cfg: LmEvalConfig = to_object_strict(raw)
        print(json.dumps(run_lm_eval(cfg), ensure_ascii=False))
        sys.stdout.flush()


if __name__ == "__main__":
    main()
