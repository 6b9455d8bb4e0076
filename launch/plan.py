"""`python -m launch.plan model=NAME gpus=N gpu=h100 tokens=T [search=true out=configs/experiment/NAME.yaml]`.

Prints parameters (total and activated), training FLOPs per token, memory per GPU (parameters, gradients, optimizer
states for the ZeRO stage and offload chosen, activations for the micro-batch and sequence length with and without
activation checkpointing), the largest micro-batch that fits, and the step time predicted for the parallel layout on
the cluster (`launch/perf.py`: compute, exposed communication, pipeline bubble), tokens/s per GPU, MFU, days,
GPU-hours and cost of T tokens (or, given `mfu=` or `run_dir=`, time at that MFU as before). `search=true` lists the
layouts the trainer accepts that fit, cheapest first, and evaluates the best; `out=` writes it as an experiment
config for `train.pretrain`. The last line is the result as one JSON object.

Tensor parallelism divides the weights, gradients and optimizer states of the dense part and the head- and
hidden-width activations by tp; pipeline parallelism divides the layers' states by pp (activations are not: under
1F1B the first stage holds pp micro-batches of its L / pp layers); Ulysses divides the tokens of every activation by
sp; ZeRO shards over the dp x sp ranks (experts over dp x sp / ep).

Memory model (bf16 mixed precision, as DeepSpeed runs it on GPUs; fp32 on CPU):
- weights 2 B/param, gradients 2 B/param, optimizer states 12 B/param (fp32 master, Adam m and v); ZeRO-1 shards
  the optimizer states over the data-parallel ranks, ZeRO-2 also the gradients, ZeRO-3 also the weights; offload
  moves optimizer states (and with offload_param, weights) to CPU memory. Routed experts are first split over
  `ep_size` ranks, and ZeRO shards a rank's experts over the gpus / ep_size ranks holding the same ones
  (DeepSpeed's expert-data-parallel group). On CPU (fp32, process RSS): 4 + 4 + 8 B/param, plus DeepSpeed's
  buffers (ZeRO-0: the flat all-reduce bucket, 4 B/param; ZeRO-1/2: fp32 partition copy, flat reduce bucket and the
  parameters' original storage left resident, 4/N + 4 + 4 B/param) and activations x 1.4 (freed pages glibc keeps),
  calibrated and checked against real runs in BENCHMARKS.md.
- activations per token and layer: the tensors a Llama/DeepSeek block keeps for backward with a fused attention
  kernel (no T x T scores): 2 B x (6 d + 2 kv + 4 f_active) (+ router scores for MoE layers); the output head keeps
  logits in bf16 plus their fp32 copy and gradient, 10 B x vocab per token (with `execution.loss_impl=chunked|liger`,
  one chunk of fp32 logits and gradient instead). `execution.activation_checkpointing=selective` keeps
  2 B x (3 d + 2 kv + 2 f_active) per layer (norms, RoPE and SiLU*up recomputed); `full` keeps only each layer's
  input (2 d B/token) and recomputes one layer at a time. The micro-batch and totals follow the configured mode.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import shlex
import sys
from dataclasses import replace
from pathlib import Path

import hydra
import torch
import yaml
from omegaconf import DictConfig

from data_pipeline.cli import to_object_strict, user_errors
from launch.config import ClusterConfig, PlanConfig, load_cluster
from launch.perf import Layout, rank_peak_flops, step_time
from model.config import ExecutionConfig, ModelConfig
from model.flops import activated_params, flops_per_token
from model.transformer import Transformer
from train.config import DeepSpeedConfig, move_deprecated_keys
from train.tools.report import find_runs, summarize
from train.trainer.layout import make_layout
from train.trainer.parallel import ParallelLayout

CPU_ACTIVATION_FACTOR = 1.4  # measured RSS per sequence / saved-tensor bytes, model=small on the 2-core dev VM
USABLE = 0.90  # share of GPU memory a run can plan for (allocator fragmentation, CUDA context, NCCL buffers)


def parse_tokens(text: str) -> float:
    m = re.fullmatch(r"\s*([0-9.eE+-]+)\s*([KMBT]?)\s*", str(text))
    if not m:
        raise ValueError(f"tokens={text!r}: write a number such as 1e12 or 300B")
    return float(m.group(1)) * {"": 1, "K": 1e3, "M": 1e6, "B": 1e9, "T": 1e12}[m.group(2)]


def param_counts(cfg: ModelConfig) -> dict[str, int]:
    """Exact totals from the model built on the meta device (no memory), split into routed experts and the rest."""
    with torch.device("meta"):  # kernels do not change the parameters, and the planner may run where liger cannot
        model = Transformer(cfg)  # the default ExecutionConfig: pure-PyTorch kernels and loss
    total = routed = tensors = 0
    for name, p in model.named_parameters():
        total += p.numel()
        tensors += 1
        if ".experts." in name or name.endswith(".experts"):
            routed += p.numel()
    embed = cfg.vocab_size * cfg.d_model
    activated = activated_params(cfg)
    return {"total": total, "routed_experts": routed, "activated": activated, "embedding": embed, "tensors": tensors}


def _active_ffn(cfg: ModelConfig, layer: int) -> int:
    m = cfg.moe
    if cfg.is_moe_layer(layer):
        return m.ffn_hidden * (m.top_k + m.n_shared_experts)
    return cfg.ffn_hidden


def activation_bytes(
    cfg: ModelConfig,
    execution: ExecutionConfig,
    seq_len: int,
    micro: int,
    mode: str,
    dtype_bytes: int,
    tp: int = 1,
    sp: int = 1,
) -> float:
    """Activation memory of one micro-batch under activation checkpointing `mode` (see module docstring), on one
    rank of a tp x sp group."""
    d = cfg.d_model
    kv = cfg.n_kv_heads * cfg.head_dim if cfg.attention == "gqa" else cfg.kv_lora_rank + cfg.qk_rope_head_dim
    tokens = seq_len * micro / sp
    layers = cfg.n_layers + cfg.mtp.depth
    # selective keeps the matmul and attention outputs (q/k/v, attention, gate and up) and recomputes the norms,
    # RoPE and SiLU * up; none also keeps those.
    keep = (3, 2) if mode == "selective" else (6, 4)
    per_layer = [
        dtype_bytes * (keep[0] * d + (2 * kv + keep[1] * _active_ffn(cfg, i)) / tp)
        + (4 * cfg.moe.n_routed_experts if cfg.is_moe_layer(i) else 0)
        for i in range(layers)
    ]
    heads = 1 + cfg.mtp.depth
    if execution.loss_impl == "torch":
        head = tokens * (dtype_bytes + 8) * cfg.vocab_size / tp * heads
    else:  # chunked / fused: one (chunk, vocab) fp32 block of logits and its gradient at a time
        head = 8 * cfg.vocab_size / tp * min(tokens, execution.loss_chunk_size)
    if mode == "full":
        return tokens * (dtype_bytes * d * layers + max(per_layer)) + head
    return tokens * sum(per_layer) + head


def state_bytes(
    counts: dict,
    ds: DeepSpeedConfig,
    cfg: ModelConfig,
    gpus: int,
    fp32: bool,
    ep_size: int = 1,
    tp: int = 1,
    pp: int = 1,
) -> dict[str, float]:
    """Weights, gradients and optimizer states per GPU for the ZeRO stage and offload chosen. `gpus` is the ZeRO
    group (the data-parallel ranks: world / (tp x pp)); the dense part is split by tp and pp, the experts by ep and
    pp."""
    ep = ep_size if cfg.moe.enabled else 1
    dense = (counts["total"] - counts["routed_experts"]) / (tp * pp)
    experts = counts["routed_experts"] / (ep * pp)  # this rank's experts, ZeRO-sharded over the gpus / ep ranks
    w, g, o = (4, 4, 8) if fp32 else (2, 2, 12)
    s = ds.zero_stage

    def sharded(bytes_per_param: int, from_stage: int) -> float:
        if s < from_stage:
            return (dense + experts) * bytes_per_param
        return dense * bytes_per_param / gpus + experts * bytes_per_param / max(1, gpus // ep)

    weights = 0.0 if ds.offload_param else sharded(w, 3)
    grads = sharded(g, 2)
    optim = 0.0 if ds.offload_optimizer else sharded(o, 1)
    states = {"weights": weights, "gradients": grads, "optimizer": optim}
    if fp32:
        # What DeepSpeed adds on CPU (gloo), as measured on the dev VM (BENCHMARKS.md): ZeRO-0 flattens all gradients
        # into one all-reduce bucket (4 B/param); ZeRO-1/2 keep an fp32 copy of the partition, a flat reduce bucket of
        # up to reduce_bucket_size elements, and the parameters' original storage, which glibc keeps resident after
        # DeepSpeed moves them into its flat buffer (4 B/param each). Not modelled for ZeRO-3.
        n = dense + experts
        if s == 0:
            states["buffers"] = 4.0 * n
        elif s in (1, 2):
            states["buffers"] = 4.0 * n / gpus + 4.0 * min(n, ds.reduce_bucket_size) + 4.0 * n
    return states


def trainer_refusal(model: ModelConfig, layout: Layout, seq_len: int, global_batch_tokens: int) -> str | None:
    """The trainer's own message refusing this layout (None = accepted), from the checks it runs before training:
    train/trainer/parallel.py `ParallelLayout.check`, the batch arithmetic `make_layout`, and build.py's refusal
    of selective checkpointing under ZeRO-3."""
    try:
        ParallelLayout(layout.gpus, layout.tp, layout.sp, layout.pp, layout.ep if model.moe.enabled else 1).check(
            model, seq_len, layout.zero_stage
        )
        make_layout(global_batch_tokens, seq_len, layout.micro_batch_size, layout.dp)
        DeepSpeedConfig(
            zero_stage=layout.zero_stage,
            offload_optimizer=layout.offload_optimizer,
            offload_param=layout.offload_param,
        )
    except ValueError as e:
        return str(e)
    if layout.activation_checkpointing == "selective" and layout.zero_stage == 3:  # train/trainer/build.py
        return "execution.activation_checkpointing=selective does not work with deepspeed.zero_stage=3"
    return None


class Planner:
    """Everything about one model on one cluster that does not depend on the layout, and the per-layout figures."""

    def __init__(self, cfg: PlanConfig):
        self.cfg = cfg
        self.model = cfg.model if cfg.model.vocab_size else replace(cfg.model, vocab_size=cfg.vocab_size)
        self.cluster: ClusterConfig = load_cluster(cfg.gpu)
        self.fp32 = self.cluster.fp32
        self.counts = param_counts(self.model)
        self.fpt = flops_per_token(self.model, cfg.seq_len)
        mem = cfg.gpu_memory_gb or self.cluster.memory_gb
        self.capacity = mem * 1e9 * USABLE
        self.tokens = parse_tokens(cfg.tokens)
        overlap = cfg.comm_overlap
        self.comm_overlap = overlap if overlap is not None else (0.8 if cfg.deepspeed.overlap_comm else 0.0)

    def slowdown(self) -> float:
        """Step-time factor of a shared CPU at the plan's load average against the cluster's calibration load."""
        c, load = self.cluster, self.cfg.load_average
        if not (c.shared_compute and load and c.load_average):
            return 1.0
        return load / c.load_average

    def activations(self, layout: Layout, mode: str, micro: int = 1) -> float:
        ex = self.cfg.execution
        a = activation_bytes(
            self.model, ex, self.cfg.seq_len, micro, mode, 4 if self.fp32 else 2, tp=layout.tp, sp=layout.sp
        )
        return a * CPU_ACTIVATION_FACTOR if self.fp32 else a

    def states(self, layout: Layout) -> dict[str, float]:
        ds = replace(
            self.cfg.deepspeed,
            zero_stage=layout.zero_stage,
            offload_optimizer=layout.offload_optimizer,
            offload_param=layout.offload_param,
        )
        return state_bytes(
            self.counts, ds, self.model, layout.dp * layout.sp, self.fp32, layout.ep, tp=layout.tp, pp=layout.pp
        )

    def largest_micro_batch(self, layout: Layout, mode: str) -> int:
        """Activations grow linearly with the micro-batch (the chunked loss's one chunk does not)."""
        one, two = self.activations(layout, mode, 1), self.activations(layout, mode, 2)
        per_seq, fixed = two - one, sum(self.states(layout).values()) + 2 * one - two
        return max(0, math.floor((self.capacity - fixed) / per_seq))

    def evaluate(self, layout: Layout) -> dict:
        """Memory per GPU, step time and its parts, throughput, MFU, GPU-hours and cost of one layout."""
        cfg, c = self.cfg, self.cluster
        states = self.states(layout)
        act = self.activations(layout, layout.activation_checkpointing, layout.micro_batch_size)
        total = sum(states.values()) + act
        t = step_time(
            self.model,
            self.counts,
            layout,
            c,
            cfg.seq_len,
            cfg.global_batch_tokens,
            compile=cfg.execution.compile,
            fp8=cfg.execution.fp8,
            fp8_recipe=cfg.fp8_recipe,
            comm_overlap=self.comm_overlap,
            ep_overlap=cfg.ep_overlap,
            tp_overlap=cfg.tp_overlap,
            recompute_share=cfg.recompute_share,
            comm_sm_share=cfg.comm_sm_share,
            slowdown=self.slowdown(),
        )
        tps_gpu = cfg.global_batch_tokens / t["step_time_s"] / layout.gpus
        mfu = self.fpt * tps_gpu / rank_peak_flops(c, layout.gpus)
        gpu_hours = self.tokens / tps_gpu / 3600
        return {
            "layout": layout.as_dict(),
            "memory_gb_per_gpu": total / 1e9,
            "fits": total <= self.capacity,
            "step_time_s": t["step_time_s"],
            "compute_s": t["compute_s"],
            "comm_s": t["comm_s"],
            "bubble_s": t["bubble_s"],
            "step_parts_s": t["parts_s"],
            "micro_batches_per_step": t["micro_batches"],
            "tokens_per_s_per_gpu": tps_gpu,
            "mfu": mfu,
            "gpu_hours": gpu_hours,
            "days": gpu_hours / layout.gpus / 24,
            "cost_usd": gpu_hours * cfg.price_per_gpu_hour,
            "trainer_refusal": trainer_refusal(self.model, layout, cfg.seq_len, cfg.global_batch_tokens),
        }

    def given_layout(self) -> Layout:
        """The layout the config names; micro-batch null = the largest that fits in the configured mode."""
        cfg = self.cfg
        par, ds = cfg.parallel, cfg.deepspeed
        base = Layout(
            gpus=cfg.gpus,
            tp=par.tp_size,
            sp=par.sp_size,
            pp=par.pp_size,
            ep=par.ep_size if self.model.moe.enabled else 1,
            zero_stage=ds.zero_stage,
            offload_optimizer=ds.offload_optimizer,
            offload_param=ds.offload_param,
            activation_checkpointing=cfg.execution.activation_checkpointing,
        )
        micro = cfg.micro_batch_size or self.largest_micro_batch(base, base.activation_checkpointing) or 1
        return replace(base, micro_batch_size=micro)

    def candidates(self):
        """Every layout the trainer accepts (ParallelLayout.check and the batch arithmetic) that fits in memory."""
        cfg, c, m = self.cfg, self.cluster, self.model
        W = cfg.gpus
        pow2 = [2**i for i in range(12)]
        tps = [t for t in pow2 if t <= c.gpus_per_node and W % t == 0]
        sps = [s for s in pow2 if s <= c.gpus_per_node and W % s == 0 and cfg.seq_len % s == 0]
        pps = [p for p in pow2 if p <= m.n_layers and W % p == 0]
        eps = [e for e in pow2 if m.moe.enabled and W % e == 0 and m.moe.n_routed_experts % e == 0] or [1]
        offloads = [(False, False), (True, False), (True, True)]
        seqs = cfg.global_batch_tokens // cfg.seq_len
        for tp in tps:
            for sp in sps:
                for pp in pps:
                    if W % (tp * sp * pp):
                        continue
                    for ep in eps:
                        for zero in (0, 1, 2, 3):
                            probe = Layout(W, tp, sp, pp, ep, zero)
                            try:  # the parallel degrees alone: prune before micro-batches and checkpointing
                                ParallelLayout(W, tp, sp, pp, ep).check(m, cfg.seq_len, zero)
                            except ValueError:
                                continue
                            for off_opt, off_par in offloads:
                                if (off_opt and zero == 0) or (off_par and zero != 3):
                                    continue
                                for mode in ("none", "selective", "full"):
                                    if mode == "selective" and zero == 3:
                                        continue
                                    lay = replace(
                                        probe,
                                        offload_optimizer=off_opt,
                                        offload_param=off_par,
                                        activation_checkpointing=mode,
                                    )
                                    largest = self.largest_micro_batch(lay, mode)
                                    per_dp = seqs // lay.dp if seqs % lay.dp == 0 else 0
                                    for mb in pow2:
                                        if mb > largest or mb > per_dp:
                                            break
                                        if per_dp % mb == 0:
                                            yield replace(lay, micro_batch_size=mb)

    def search(self) -> list[dict]:
        """The layouts that fit and that the trainer accepts, cheapest first (then less memory)."""
        rows = []
        for lay in self.candidates():
            r = self.evaluate(lay)
            if r["fits"] and r["trainer_refusal"] is None:
                rows.append(r)
        rows.sort(key=lambda r: (r["gpu_hours"], r["memory_gb_per_gpu"]))
        return rows


def plan(cfg: PlanConfig) -> dict:
    """The plan of the configured layout, or with `search=true` of the cheapest layout found (JSON-ready)."""
    p = Planner(cfg)
    model, counts = p.model, p.counts
    searched = p.search() if cfg.search else None
    if cfg.search and not searched:
        raise ValueError(
            f"search=true: no layout of {model.name} on {cfg.gpus} x {p.cluster.name} fits in "
            f"{p.capacity / 1e9:.0f} GB per GPU that the trainer accepts. Use more gpus, a larger gpu, a shorter "
            "seq_len or a different global_batch_tokens"
        )
    layout = Layout(**_layout_args(searched[0]["layout"]), gpus=cfg.gpus) if searched else p.given_layout()
    best = p.evaluate(layout)
    states = p.states(layout)
    fixed = sum(states.values())
    mode = layout.activation_checkpointing
    act = {m: p.activations(layout, m) for m in ("none", "selective", "full")}
    largest = {m: p.largest_micro_batch(replace(layout, activation_checkpointing=m), m) for m in act}
    micro = layout.micro_batch_size
    gb = 1e9
    out = {
        "model": model.name,
        "cluster": p.cluster.name,
        "gpus": cfg.gpus,
        "params_total": counts["total"],
        "params_activated": counts["activated"],
        "flops_per_token": p.fpt,
        "memory_gb": {
            **{k: v / gb for k, v in states.items()},
            "activation_checkpointing": mode,
            "loss_impl": cfg.execution.loss_impl,
            "activations_per_micro_batch": act[mode] / gb,
            "activations_per_micro_batch_selective": act["selective"] / gb,
            "activations_per_micro_batch_checkpointed": act["full"] / gb,
            "micro_batch_size": micro,
            "total": (fixed + p.activations(layout, mode, micro)) / gb,
            "total_checkpointed": (fixed + p.activations(layout, "full", micro)) / gb,
            "capacity": p.capacity / gb,
        },
        "largest_micro_batch": {
            "no_checkpointing": largest["none"],
            "selective_checkpointing": largest["selective"],
            "full_checkpointing": largest["full"],
        },
        "tokens": p.tokens,
        "global_batch_tokens": cfg.global_batch_tokens,
        "layout": best["layout"],
        "step_time_s": best["step_time_s"],
        "compute_s": best["compute_s"],
        "comm_s": best["comm_s"],
        "bubble_s": best["bubble_s"],
        "step_parts_s": best["step_parts_s"],
        "tokens_per_s_per_gpu": best["tokens_per_s_per_gpu"],
        "mfu": best["mfu"],
        "mfu_source": "predicted",
        "days": best["days"],
        "gpu_hours": best["gpu_hours"],
        "gpu_hours_per_trillion_tokens": best["gpu_hours"] * 1e12 / p.tokens,
        "cost_usd": best["cost_usd"],
        "trainer_refusal": best["trainer_refusal"],
    }
    given = cfg.mfu
    if cfg.run_dir:
        (run,), _ = find_runs([cfg.run_dir])
        given = summarize(run)["mfu"]
        if given is None:
            raise ValueError(f"run_dir={cfg.run_dir} logged no MFU figure: pass mfu=FRACTION instead")
    if given is not None:  # time at a given MFU, as before issue 15: FLOPs / (peak x mfu)
        tps_gpu = rank_peak_flops(p.cluster, cfg.gpus) * given / p.fpt
        out.update(
            mfu=given,
            mfu_source="run_dir" if cfg.run_dir else "given",
            tokens_per_s_per_gpu=tps_gpu,
            step_time_s=cfg.global_batch_tokens / (tps_gpu * cfg.gpus),
            gpu_hours=p.tokens / tps_gpu / 3600,
        )
        out.update(
            days=out["gpu_hours"] / cfg.gpus / 24,
            gpu_hours_per_trillion_tokens=out["gpu_hours"] * 1e12 / p.tokens,
            cost_usd=out["gpu_hours"] * cfg.price_per_gpu_hour,
        )
    if searched is not None:
        out["search"] = [_summary(r) for r in searched[: cfg.search_top]]
        out["layouts_considered"] = len(searched)
    return out


def _layout_args(d: dict) -> dict:
    return {
        "tp": d["tp_size"],
        "sp": d["sp_size"],
        "pp": d["pp_size"],
        "ep": d["ep_size"],
        "zero_stage": d["zero_stage"],
        "offload_optimizer": d["offload_optimizer"],
        "offload_param": d["offload_param"],
        "micro_batch_size": d["micro_batch_size"],
        "activation_checkpointing": d["activation_checkpointing"],
    }


def _summary(r: dict) -> dict:
    keys = (
        "layout",
        "memory_gb_per_gpu",
        "step_time_s",
        "compute_s",
        "comm_s",
        "bubble_s",
        "tokens_per_s_per_gpu",
        "mfu",
        "gpu_hours",
        "cost_usd",
    )
    return {k: r[k] for k in keys}


def _describe(d: dict) -> str:
    lay = Layout(gpus=d["dp"] * d["tp_size"] * d["sp_size"] * d["pp_size"], **_layout_args(d))
    return lay.describe()


def render(cfg: PlanConfig, p: dict) -> str:
    m = p["memory_gb"]
    lines = [
        f"model {p['model']}: {p['params_total'] / 1e9:.3f}B parameters, {p['params_activated'] / 1e9:.3f}B activated "
        f"per token; {p['flops_per_token'] / 1e9:.2f} GFLOPs/token at seq_len {cfg.seq_len}",
        f"{cfg.gpus} x {p['cluster']}, {_describe(p['layout'])}, global batch {cfg.global_batch_tokens:,} tokens",
        f"memory per GPU (GB): weights {m['weights']:.2f}, gradients {m['gradients']:.2f}, optimizer "
        f"{m['optimizer']:.2f}, "
        + (f"DeepSpeed buffers {m['buffers']:.2f}, " if "buffers" in m else "")
        + f"activations per micro-batch {m['activations_per_micro_batch']:.2f} "
        f"(activation checkpointing {m['activation_checkpointing']}, loss {m['loss_impl']}; "
        f"{m['activations_per_micro_batch_selective']:.2f} selective, "
        f"{m['activations_per_micro_batch_checkpointed']:.2f} full)",
        f"at micro-batch {m['micro_batch_size']}: {m['total']:.1f} GB ({m['total_checkpointed']:.1f} GB checkpointed)"
        f" of {m['capacity']:.0f} GB usable",
        f"largest micro-batch that fits: {p['largest_micro_batch']['no_checkpointing']} "
        f"({p['largest_micro_batch']['selective_checkpointing']} with selective, "
        f"{p['largest_micro_batch']['full_checkpointing']} with full activation checkpointing)",
    ]
    if p["mfu_source"] == "predicted":
        lines.append(
            f"step {p['step_time_s']:.3f} s = compute {p['compute_s']:.3f} + exposed communication {p['comm_s']:.3f} "
            f"+ pipeline bubble {p['bubble_s']:.3f}"
        )
    lines.append(
        f"{p['tokens']:.3g} tokens at {p['tokens_per_s_per_gpu']:,.0f} tokens/s per GPU, MFU {p['mfu']:.1%} "
        f"({p['mfu_source']}): {p['days']:.1f} days, {p['gpu_hours']:,.0f} GPU-hours "
        f"({p['gpu_hours_per_trillion_tokens']:,.0f} per trillion tokens), ${p['cost_usd']:,.0f} at "
        f"${cfg.price_per_gpu_hour}/GPU-hour"
    )
    if p["trainer_refusal"]:
        lines.append(f"warning: train.pretrain refuses this layout: {p['trainer_refusal']}")
    if "search" in p:
        lines.append(f"{p['layouts_considered']} layouts fit and the trainer accepts; cheapest first:")
        lines.append("  # layout | GB/GPU | step s = compute + comm + bubble | tokens/s/GPU | MFU | GPU-hours | cost")
        for i, r in enumerate(p["search"], 1):
            lines.append(
                f"  {i} {_describe(r['layout'])} | {r['memory_gb_per_gpu']:.1f} | {r['step_time_s']:.3f} = "
                f"{r['compute_s']:.3f} + {r['comm_s']:.3f} + {r['bubble_s']:.3f} | {r['tokens_per_s_per_gpu']:,.0f} "
                f"| {r['mfu']:.1%} | {r['gpu_hours']:,.0f} | ${r['cost_usd']:,.0f}"
            )
    return "\n".join(lines)


def experiment_yaml(cfg: PlanConfig, p: dict, model_choice: str, command: str) -> str:
    """The plan's layout as an experiment config `train.pretrain experiment=NAME` composes unchanged. Its header
    comment `# slurm: nodes=N gpus_per_node=G` is what launch/slurm.sbatch reads."""
    lay = p["layout"]
    c = load_cluster(cfg.gpu)
    nodes = math.ceil(cfg.gpus / c.gpus_per_node)
    model = dataclasses.asdict(cfg.model)
    body = {
        "defaults": [{"override /model": model_choice}],
        "model": model,
        "execution": {**dataclasses.asdict(cfg.execution), "activation_checkpointing": lay["activation_checkpointing"]},
        "parallel": {k: lay[k] for k in ("tp_size", "sp_size", "pp_size", "ep_size")},
        "deepspeed": {
            "zero_stage": lay["zero_stage"],
            "offload_optimizer": lay["offload_optimizer"],
            "offload_param": lay["offload_param"],
            "overlap_comm": cfg.deepspeed.overlap_comm,
        },
        "train": {
            "seq_len": cfg.seq_len,
            "micro_batch_size": lay["micro_batch_size"],
            "global_batch_tokens": cfg.global_batch_tokens,
            "max_steps": math.ceil(p["tokens"] / cfg.global_batch_tokens),
        },
    }
    header = [
        "# @package _global_",
        f"# Written by: {command}",
        f"# Plan ({cfg.gpus} x {c.name}): {_describe(lay)}; {p['memory_gb']['total']:.1f} GB per GPU, step "
        f"{p['step_time_s']:.2f} s (compute {p['compute_s']:.2f} + comm {p['comm_s']:.2f} + bubble "
        f"{p['bubble_s']:.2f}),",
        f"# {p['tokens_per_s_per_gpu']:,.0f} tokens/s per GPU, MFU {p['mfu']:.1%}, "
        f"{p['gpu_hours_per_trillion_tokens']:,.0f} GPU-hours per trillion tokens, ${p['cost_usd']:,.0f} for "
        f"{p['tokens']:.3g} tokens at ${cfg.price_per_gpu_hour}/GPU-hour.",
        "# Set tokenizer.path, data.path and run.dir on the command line (or below). Launch:",
        f"#   bash launch/slurm.sbatch experiment=NAME run.dir=...   (submits itself with --nodes={nodes})",
        f"#   or torchrun --nnodes={nodes} --nproc_per_node={min(cfg.gpus, c.gpus_per_node)} -m train.pretrain "
        "experiment=NAME ...",
        f"# slurm: nodes={nodes} gpus_per_node={min(cfg.gpus, c.gpus_per_node)}",
    ]
    return "\n".join(header) + "\n" + yaml.safe_dump(body, sort_keys=False, width=120)


@hydra.main(config_path="../configs", config_name="plan", version_base="1.3")
def main(raw: DictConfig) -> None:
    from hydra.core.hydra_config import HydraConfig

    with user_errors():
        move_deprecated_keys(raw)
        cfg: PlanConfig = to_object_strict(raw)
        p = plan(cfg)
        if cfg.out:
            if p["trainer_refusal"]:
                raise ValueError(f"out={cfg.out}: train.pretrain refuses this layout ({p['trainer_refusal']})")
            choice = HydraConfig.get().runtime.choices.get("model") or cfg.model.name
            command = "python -m launch.plan " + " ".join(shlex.quote(a) for a in sys.argv[1:])
            Path(cfg.out).parent.mkdir(parents=True, exist_ok=True)
            Path(cfg.out).write_text(experiment_yaml(cfg, p, choice, command))
            p["out"] = cfg.out
    print(render(cfg, p))
    if cfg.out:
        print(f"wrote {cfg.out}: torchrun ... -m train.pretrain experiment={Path(cfg.out).stem}")
    print(json.dumps(p))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
