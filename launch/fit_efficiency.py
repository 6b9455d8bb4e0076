"""`python -m launch.fit_efficiency gpu=PRESET_OR_FILE [curve=true] [results=A.jsonl,RUN_DIR,...] [out=FILE.yaml]`:
refit a cluster's compute model on your own hardware.

- `curve=true` times square matmuls (128 .. 8192, bf16 on a GPU, fp32 with one thread on CPU) on this machine and
  replaces the cluster's `efficiency` points: [GEMM GFLOP, achieved / peak_tflops_bf16].
- `results=` fits `elementwise_passes` (records without compile), `elementwise_passes_compiled` (with) and, with
  `fit_overhead=true`, `step_overhead_s`, by least squares on the relative error of the predicted step time. A
  record is a `train.bench` JSON line (impl hangang; optional keys `vocab_size`, default 32000, and `gpus`, default 1)
  from a .jsonl file, or a `train.pretrain` run directory (its config.yaml and the median step time of steps >= 2;
  `RUN_DIR@N` for a run of N processes).

Prints the fitted cluster as YAML and each record's measured and predicted step time; `out=` writes the YAML.
"""

from __future__ import annotations

import dataclasses
import json
import statistics
import sys
import time
from pathlib import Path

import yaml
from omegaconf import OmegaConf

from data_pipeline.cli import user_errors
from launch.config import CLUSTERS, ClusterConfig, PlanConfig, load_cluster
from launch.plan import Planner

MODELS = CLUSTERS.parent / "model"


def measure_curve(cluster: ClusterConfig, sizes: tuple[int, ...] = (128, 256, 512, 1024, 2048, 4096, 8192)):
    """[GFLOP, efficiency] of n x n x n matmuls on this machine against the cluster's bf16 peak per device (or per
    core on CPU, timed with one thread)."""
    import torch

    from model.accelerator import is_accelerator, resolve_device, synchronize

    device = resolve_device("auto")
    gpu = is_accelerator(device)
    dtype = torch.bfloat16 if gpu else torch.float32
    threads = torch.get_num_threads()
    if not gpu:
        torch.set_num_threads(1)
    points = []
    try:
        for n in sizes:
            if not gpu and n > 2048:
                break
            a = torch.randn(n, n, device=device, dtype=dtype)
            b = torch.randn(n, n, device=device, dtype=dtype)
            reps = max(2, int(2e11 / n**3)) if gpu else max(2, int(4e9 / n**3))
            best = float("inf")
            for _ in range(3):
                synchronize(device)
                t0 = time.perf_counter()
                for _ in range(reps):
                    a @ b
                synchronize(device)
                best = min(best, (time.perf_counter() - t0) / reps)
            flop = 2.0 * n**3
            points.append([round(flop / 1e9, 4), round(min(1.0, flop / best / (cluster.peak_tflops_bf16 * 1e12)), 4)])
    finally:
        torch.set_num_threads(threads)
    return points


def _plan_config(cluster_file: str, model: dict, execution: dict, parallel: dict, deepspeed: dict, **keys):
    raw = OmegaConf.merge(
        OmegaConf.structured(PlanConfig),
        {"model": model, "execution": execution, "parallel": parallel, "deepspeed": deepspeed, "gpu": cluster_file},
        keys,
    )
    return OmegaConf.to_object(raw)


def load_records(specs: list[str], cluster_file: str) -> list[tuple[str, PlanConfig, float]]:
    """(label, plan config reproducing the run, measured seconds per step) for each record."""
    out = []
    for spec in specs:
        path, _, n = spec.partition("@")
        p = Path(path)
        if p.is_dir():
            cfg = yaml.safe_load((p / "config.yaml").read_text())
            times = [
                json.loads(line)["step_time_s"]
                for line in (p / "metrics.jsonl").read_text().splitlines()
                if '"step_time_s"' in line and json.loads(line)["step"] >= 2
            ]
            if not times:
                raise ValueError(f"results={spec}: {p}/metrics.jsonl has no step_time_s of steps >= 2")
            t = cfg["train"]
            plan = _plan_config(
                cluster_file,
                cfg["model"],
                cfg["execution"],
                cfg["parallel"],
                {k: cfg["deepspeed"][k] for k in ("zero_stage", "offload_optimizer", "offload_param", "overlap_comm")},
                gpus=int(n or 1),
                seq_len=t["seq_len"],
                micro_batch_size=t["micro_batch_size"],
                global_batch_tokens=t["global_batch_tokens"],
            )
            out.append((f"{p.name}@{n or 1}", plan, statistics.median(times)))
            continue
        if not p.is_file():
            raise ValueError(f"results={spec}: not a file of train.bench JSON lines nor a run directory")
        for line in p.read_text().splitlines():
            if not line.strip().startswith("{"):
                continue
            r = json.loads(line)
            if r.get("impl") != "hangang" or "tokens_per_s" not in r:
                continue
            model = yaml.safe_load((MODELS / f"{r['model']}.yaml").read_text())
            model["vocab_size"] = r.get("vocab_size", 32000)
            model.update(r.get("model_overrides", {}))
            tokens = r["seq_len"] * r["micro_batch_size"]
            ex = {k: r[k] for k in ("activation_checkpointing", "loss_impl", "compile", "fp8") if k in r}
            plan = _plan_config(
                cluster_file,
                model,
                ex,
                {},
                {"zero_stage": 0},
                gpus=r.get("gpus", 1),
                seq_len=r["seq_len"],
                micro_batch_size=r["micro_batch_size"],
                global_batch_tokens=tokens,
            )
            label = f"{r['model']} mb{r['micro_batch_size']} compile={r.get('compile')} AC={ex.get('activation_checkpointing')}"
            out.append((label, plan, tokens / r["tokens_per_s"]))
    return out


def _parts(cluster: ClusterConfig, plan: PlanConfig, passes: float, overhead: float) -> float:
    c = dataclasses.replace(cluster, elementwise_passes=passes, elementwise_passes_compiled=passes, step_overhead_s=overhead)
    planner = Planner(plan)
    planner.cluster = c
    planner.fp32 = c.fp32
    return planner.evaluate(planner.given_layout())["step_time_s"]


def fit(cluster: ClusterConfig, records, fit_overhead: bool) -> ClusterConfig:
    """Least squares on relative error: t = a + passes x b (+ overhead), one passes per compile setting."""
    import numpy as np

    fitted = {}
    for compiled in (False, True):
        group = [r for r in records if bool(r[1].execution.compile) == compiled]
        if not group:
            continue
        rows, rhs = [], []
        for _, plan, t in group:
            a = _parts(cluster, plan, 0.0, 0.0)
            b = _parts(cluster, plan, 1.0, 0.0) - a
            rows.append([b / t, 1 / t] if fit_overhead else [b / t])
            rhs.append(1 - a / t)
        sol, *_ = np.linalg.lstsq(np.array(rows), np.array(rhs), rcond=None)
        key = "elementwise_passes_compiled" if compiled else "elementwise_passes"
        fitted[key] = round(max(0.0, float(sol[0])), 3)
        if fit_overhead and not compiled:
            fitted["step_overhead_s"] = round(max(0.0, float(sol[1])), 4)
    return dataclasses.replace(cluster, **fitted)


def main(argv: list[str]) -> None:
    args = dict(a.split("=", 1) for a in argv if "=" in a)
    if any("=" not in a for a in argv) or not args.get("gpu"):
        raise ValueError(
            "usage: python -m launch.fit_efficiency gpu=PRESET_OR_FILE [curve=true] [results=A.jsonl,RUN_DIR@N,...] "
            "[fit_overhead=true] [out=FILE.yaml]"
        )
    gpu = args["gpu"]
    cluster = load_cluster(gpu)
    cluster_file = gpu if gpu.endswith((".yaml", ".yml")) else str(CLUSTERS / f"{gpu}.yaml")
    if args.get("curve") == "true":
        cluster = dataclasses.replace(cluster, efficiency=measure_curve(cluster))
    specs = [s for s in args.get("results", "").split(",") if s]
    if specs:
        records = load_records(specs, cluster_file)
        cluster = fit(cluster, records, args.get("fit_overhead") == "true")
        for label, plan, t in records:
            pred = _parts(cluster, plan, cluster.elementwise_passes_compiled if plan.execution.compile
                          else cluster.elementwise_passes, cluster.step_overhead_s)  # fmt: skip
            print(f"# {label}: measured {t:.4f} s/step, fitted model {pred:.4f} ({pred / t - 1:+.1%})")
    text = yaml.safe_dump(dataclasses.asdict(cluster), sort_keys=False, width=120)
    print(text)
    if args.get("out"):
        Path(args["out"]).write_text(text)
        print(f"# wrote {args['out']}")


if __name__ == "__main__":
    with user_errors():
        main(sys.argv[1:])
