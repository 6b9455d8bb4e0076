"""`python -m launch.fit_efficiency gpu=PRESET_OR_FILE [curve=true] [results=A.jsonl,RUN_DIR,...] [out=FILE.yaml]`:
refit a cluster's compute model on your own hardware.

- `curve=true` times square matmuls (128 .. 8192, bf16 on a GPU, fp32 with one thread on CPU, 128 .. 2048) on this
  machine, median of 5 rounds, and replaces the cluster's `efficiency` points: [GEMM GFLOP, achieved /
  peak_tflops_bf16].
- `results=` fits `elementwise_passes` (records without compile), `elementwise_passes_compiled` (with) and, with
  `fit_loss=true` / `fit_overhead=true` / `fit_micro_overhead=true` / `fit_scale=true` / `fit_latency=true`,
  `loss_passes` / `step_overhead_s` / `micro_step_overhead_s` / a common scale of the `efficiency` points / the
  collective latency (intra- and inter-node alike) from the records without compile, by least squares on the relative
  error of the predicted step time. A record is a `train.bench` JSON line (impl hangang; its `model_config`, or
  for a line written by hand the model's name with optional `vocab_size`, default 32000, and `model_overrides`;
  `gpus`, default 1) from a .jsonl file, or a `train.pretrain` run directory (its config.yaml and the median step
  time of steps >= 2; `RUN_DIR@N` for a run of N processes, `RUN_DIR@N@LOAD` with the machine's load average during
  it: on a shared CPU (`shared_compute`) the fit normalises each record to the cluster's
  `load_average`, or sets it to the records' mean load when it is unset).

Prints the fitted cluster as YAML and each record's measured and predicted step time; `out=` writes the YAML;
`fit=false` only compares the records with the cluster as it is (a check).
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
            rounds = []
            for _ in range(5):
                synchronize(device)
                t0 = time.perf_counter()
                for _ in range(reps):
                    a @ b
                synchronize(device)
                rounds.append((time.perf_counter() - t0) / reps)
            # The median round: on a machine shared with other work this is the rate training sees, not the best.
            flop = 2.0 * n**3
            eff = flop / statistics.median(rounds) / (cluster.peak_tflops_bf16 * 1e12)
            points.append([round(flop / 1e9, 4), round(min(1.0, eff), 4)])
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
        path, _, rest = spec.partition("@")
        n, _, load = rest.partition("@")
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
                load_average=float(load) if load else None,
            )
            out.append((f"{p.name}@{n or 1}" + (f" load {load}" if load else ""), plan, statistics.median(times)))
            continue
        if not p.is_file():
            raise ValueError(f"results={spec}: not a file of train.bench JSON lines nor a run directory")
        for line in p.read_text().splitlines():
            if not line.strip().startswith("{"):
                continue
            r = json.loads(line)
            if r.get("impl") != "hangang" or "tokens_per_s" not in r:
                continue
            if "model_config" in r:  # written by train.bench: the architecture it timed
                model = r["model_config"]
            else:  # a record written by hand: a model config's name, its vocabulary and overrides
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
            ac = ex.get("activation_checkpointing")
            label = f"{r['model']} mb{r['micro_batch_size']} compile={r.get('compile')} AC={ac}"
            out.append((label, plan, tokens / r["tokens_per_s"]))
    return out


def _predict(cluster: ClusterConfig, plan: PlanConfig) -> dict:
    planner = Planner(plan)
    planner.cluster = cluster
    planner.fp32 = cluster.fp32
    return planner.evaluate(planner.given_layout())


def _per_unit(base: ClusterConfig, plan: PlanConfig, predicted: dict, **one: float) -> float:
    """Step seconds that setting these cluster fields to one unit adds to `predicted` (made with `base`)."""
    return _predict(dataclasses.replace(base, **one), plan)["step_time_s"] - predicted["step_time_s"]


def fit(
    cluster: ClusterConfig,
    records,
    fit_overhead: bool,
    fit_loss: bool = False,
    fit_scale: bool = False,
    fit_latency: bool = False,
    fit_micro_overhead: bool = False,
):
    """Least squares on the relative error of t = rest + s x matmul + passes x layers' elementwise
    (+ loss_passes x the loss's) (+ overhead): `elementwise_passes` (or `_compiled`) per compile setting; the
    efficiency curve's scale 1/s, `loss_passes` and `step_overhead_s`, when asked, from the records without
    compile."""
    import numpy as np

    fitted = {}
    scale = 1.0
    loads = [r[1].load_average for r in records if r[1].load_average]
    if cluster.shared_compute and loads and not cluster.load_average:
        cluster = dataclasses.replace(cluster, load_average=round(statistics.mean(loads), 2))
        fitted["load_average"] = cluster.load_average
    for compiled in (False, True):
        group = [r for r in records if bool(r[1].execution.compile) == compiled]
        if not group:
            continue
        extra = not compiled
        rows, rhs = [], []
        for _, plan, t in group:
            base = dataclasses.replace(
                cluster,
                elementwise_passes=1.0,
                elementwise_passes_compiled=1.0,
                loss_passes=0.0 if fit_loss and extra else None,
                step_overhead_s=0.0,
                micro_step_overhead_s=0.0 if fit_micro_overhead and extra else cluster.micro_step_overhead_s,
            )
            if fit_latency and extra:
                base = dataclasses.replace(base, intra_node_latency_us=0.0, inter_node_latency_us=0.0)
            p = _predict(base, plan)
            mm = p["step_parts_s"]["matmul_dense"] + p["step_parts_s"]["matmul_experts"]
            el = p["step_parts_s"]["elementwise"]
            rest = p["step_time_s"] - mm - el
            row = [el / t]
            if fit_scale and extra:
                row.append(mm / t)
            else:
                rest += mm
            if fit_loss and extra:
                only_loss = dataclasses.replace(
                    base, elementwise_passes=0.0, elementwise_passes_compiled=0.0, loss_passes=1.0
                )
                row.append(_predict(only_loss, plan)["step_parts_s"]["elementwise"] / t)
            if fit_overhead and extra:  # seconds per second of step overhead (more where ranks share CPU cores)
                row.append(_per_unit(base, plan, p, step_overhead_s=1.0) / t)
            if fit_micro_overhead and extra:
                row.append(_per_unit(base, plan, p, micro_step_overhead_s=1.0) / t)
            if fit_latency and extra:  # seconds per microsecond of collective latency
                row.append(_per_unit(base, plan, p, intra_node_latency_us=1.0, inter_node_latency_us=1.0) / t)
            rows.append(row)
            rhs.append(1 - rest / t)
        sol = [float(x) for x in np.linalg.lstsq(np.array(rows), np.array(rhs), rcond=None)[0]]
        fitted["elementwise_passes_compiled" if compiled else "elementwise_passes"] = round(max(0.0, sol.pop(0)), 3)
        if fit_scale and extra:
            scale = max(1e-3, sol.pop(0))
        if fit_loss and extra:
            fitted["loss_passes"] = round(max(0.0, sol.pop(0)), 3)
        if fit_overhead and extra:
            fitted["step_overhead_s"] = round(max(0.0, sol.pop(0)), 4)
        if fit_micro_overhead and extra:
            fitted["micro_step_overhead_s"] = round(max(0.0, sol.pop(0)), 4)
        if fit_latency and extra:
            latency = round(max(0.0, sol.pop(0)), 1)
            fitted["intra_node_latency_us"] = fitted["inter_node_latency_us"] = latency
    if fit_scale:
        fitted["efficiency"] = [[x, round(min(1.0, y / scale), 4)] for x, y in cluster.efficiency]
    return dataclasses.replace(cluster, **fitted)


def main(argv: list[str]) -> None:
    args = dict(a.split("=", 1) for a in argv if "=" in a)
    if any("=" not in a for a in argv) or not args.get("gpu"):
        raise ValueError(
            "usage: python -m launch.fit_efficiency gpu=PRESET_OR_FILE [curve=true] [results=A.jsonl,RUN_DIR@N,...] "
            "[fit_loss|fit_overhead|fit_micro_overhead|fit_scale|fit_latency=true] [fit=false] [out=FILE.yaml]"
        )
    gpu = args["gpu"]
    cluster = load_cluster(gpu)
    cluster_file = gpu if gpu.endswith((".yaml", ".yml")) else str(CLUSTERS / f"{gpu}.yaml")
    if args.get("curve") == "true":
        cluster = dataclasses.replace(cluster, efficiency=measure_curve(cluster))
    specs = [s for s in args.get("results", "").split(",") if s]
    if specs:
        records = load_records(specs, cluster_file)
        if args.get("fit", "true") == "true":
            keys = ("fit_overhead", "fit_loss", "fit_scale", "fit_latency", "fit_micro_overhead")
            flags = [args.get(k) == "true" for k in keys]
            cluster = fit(cluster, records, *flags)
        for label, plan, t in records:
            pred = _predict(cluster, plan)["step_time_s"]
            print(f"# {label}: measured {t:.4f} s/step, predicted {pred:.4f} ({pred / t - 1:+.1%})")
    text = yaml.safe_dump(dataclasses.asdict(cluster), sort_keys=False, width=120)
    print(text)
    if args.get("out"):
        Path(args["out"]).write_text(text)
        print(f"# wrote {args['out']}")


if __name__ == "__main__":
    with user_errors():
        main(sys.argv[1:])
