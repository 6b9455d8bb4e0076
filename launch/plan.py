"""`python -m launch.plan model=NAME gpus=N gpu=h100 tokens=T deepspeed.zero_stage=S`: what a run will cost.

Prints parameters (total and activated), training FLOPs per token, memory per GPU (parameters, gradients, optimizer
states for the ZeRO stage and offload chosen, activations for the micro-batch and sequence length with and without
activation checkpointing), the largest micro-batch that fits, and the time, GPU-hours and cost of T tokens at a
given MFU (or the mean MFU measured in a run directory). The last line is the same as JSON.

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

import json
import math
import re
import sys
from dataclasses import replace

import hydra
import torch
from omegaconf import DictConfig

from data_pipeline.cli import to_object_strict, user_errors
from launch.config import GPUS, PlanConfig
from model.config import ExecutionConfig, ModelConfig
from model.flops import activated_params, flops_per_token
from model.transformer import Transformer
from train.config import DeepSpeedConfig, move_deprecated_keys
from train.tools.report import find_runs, summarize

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
    total = routed = 0
    for name, p in model.named_parameters():
        total += p.numel()
        if ".experts." in name or name.endswith(".experts"):
            routed += p.numel()
    embed = cfg.vocab_size * cfg.d_model
    return {"total": total, "routed_experts": routed, "activated": activated_params(cfg), "embedding": embed}


def _active_ffn(cfg: ModelConfig, layer: int) -> int:
    m = cfg.moe
    if cfg.is_moe_layer(layer):
        return m.ffn_hidden * (m.top_k + m.n_shared_experts)
    return cfg.ffn_hidden


def activation_bytes(
    cfg: ModelConfig, execution: ExecutionConfig, seq_len: int, micro: int, mode: str, dtype_bytes: int
) -> float:
    """Activation memory of one micro-batch under activation checkpointing `mode` (see module docstring)."""
    d = cfg.d_model
    kv = cfg.n_kv_heads * cfg.head_dim if cfg.attention == "gqa" else cfg.kv_lora_rank + cfg.qk_rope_head_dim
    tokens = seq_len * micro
    layers = cfg.n_layers + cfg.mtp.depth
    # selective keeps the matmul and attention outputs (q/k/v, attention, gate and up) and recomputes the norms,
    # RoPE and SiLU * up; none also keeps those.
    keep = (3, 2) if mode == "selective" else (6, 4)
    per_layer = [
        dtype_bytes * (keep[0] * d + 2 * kv + keep[1] * _active_ffn(cfg, i))
        + (4 * cfg.moe.n_routed_experts if cfg.is_moe_layer(i) else 0)
        for i in range(layers)
    ]
    heads = 1 + cfg.mtp.depth
    if execution.loss_impl == "torch":
        head = tokens * (dtype_bytes + 8) * cfg.vocab_size * heads
    else:  # chunked / fused: one (chunk, vocab) fp32 block of logits and its gradient at a time
        head = 8 * cfg.vocab_size * min(tokens, execution.loss_chunk_size)
    if mode == "full":
        return tokens * (dtype_bytes * d * layers + max(per_layer)) + head
    return tokens * sum(per_layer) + head


def state_bytes(
    counts: dict, ds: DeepSpeedConfig, cfg: ModelConfig, gpus: int, fp32: bool, ep_size: int = 1
) -> dict[str, float]:
    """Weights, gradients and optimizer states per GPU for the ZeRO stage and offload chosen."""
    ep = ep_size if cfg.moe.enabled else 1
    dense = counts["total"] - counts["routed_experts"]
    experts = counts["routed_experts"] / ep  # this rank's experts, ZeRO-sharded over the gpus / ep ranks sharing them
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


def plan(cfg: PlanConfig) -> dict:
    model = cfg.model if cfg.model.vocab_size else replace(cfg.model, vocab_size=cfg.vocab_size)
    fp32 = cfg.gpu == "cpu"
    counts = param_counts(model)
    fpt = flops_per_token(model, cfg.seq_len)
    states = state_bytes(counts, cfg.deepspeed, model, cfg.gpus, fp32, cfg.parallel.ep_size)
    fixed = sum(states.values())
    peak, mem = GPUS.get(cfg.gpu, (None, None))
    capacity = (cfg.gpu_memory_gb * 1e9 if cfg.gpu_memory_gb else mem or 0) * USABLE
    ex = cfg.execution
    act = {m: activation_bytes(model, ex, cfg.seq_len, 1, m, 4 if fp32 else 2) for m in ("none", "selective", "full")}
    if fp32:  # process RSS on CPU: glibc keeps the pages of freed activations and backward transients resident
        act = {m: v * CPU_ACTIVATION_FACTOR for m, v in act.items()}
    largest = {m: max(0, math.floor((capacity - fixed) / act[m])) if capacity else None for m in act}
    mode = ex.activation_checkpointing
    micro = cfg.micro_batch_size or largest[mode] or largest["full"] or 1
    mfu = cfg.mfu
    if cfg.run_dir:
        (run,), _ = find_runs([cfg.run_dir])
        mfu = summarize(run)["mfu"]
        if mfu is None:
            raise ValueError(f"run_dir={cfg.run_dir} logged no MFU figure: pass mfu=FRACTION instead")
    tokens = parse_tokens(cfg.tokens)
    seconds = tokens * fpt / (cfg.gpus * (peak or 1.0) * mfu) if peak else None
    gpu_hours = seconds * cfg.gpus / 3600 if seconds else None
    gb = 1e9
    return {
        "model": model.name,
        "params_total": counts["total"],
        "params_activated": counts["activated"],
        "flops_per_token": fpt,
        "memory_gb": {
            **{k: v / gb for k, v in states.items()},
            "activation_checkpointing": mode,
            "loss_impl": ex.loss_impl,
            "activations_per_micro_batch": act[mode] / gb,
            "activations_per_micro_batch_selective": act["selective"] / gb,
            "activations_per_micro_batch_checkpointed": act["full"] / gb,
            "micro_batch_size": micro,
            "total": (fixed + micro * act[mode]) / gb,
            "total_checkpointed": (fixed + micro * act["full"]) / gb,
            "capacity": capacity / gb if capacity else None,
        },
        "largest_micro_batch": {
            "no_checkpointing": largest["none"],
            "selective_checkpointing": largest["selective"],
            "full_checkpointing": largest["full"],
        },
        "tokens": tokens,
        "mfu": mfu,
        "days": seconds / 86400 if seconds else None,
        "gpu_hours": gpu_hours,
        "cost_usd": gpu_hours * cfg.price_per_gpu_hour if gpu_hours else None,
    }


def render(cfg: PlanConfig, p: dict) -> str:
    m = p["memory_gb"]
    lines = [
        f"model {p['model']}: {p['params_total'] / 1e9:.3f}B parameters, {p['params_activated'] / 1e9:.3f}B activated "
        f"per token; {p['flops_per_token'] / 1e9:.2f} GFLOPs/token at seq_len {cfg.seq_len}",
        f"{cfg.gpus} x {cfg.gpu}, ZeRO-{cfg.deepspeed.zero_stage}"
        + (" + optimizer offload" if cfg.deepspeed.offload_optimizer else "")
        + (" + parameter offload" if cfg.deepspeed.offload_param else ""),
        f"memory per GPU (GB): weights {m['weights']:.2f}, gradients {m['gradients']:.2f}, optimizer "
        f"{m['optimizer']:.2f}, "
        + (f"DeepSpeed buffers {m['buffers']:.2f}, " if "buffers" in m else "")
        + f"activations per micro-batch {m['activations_per_micro_batch']:.2f} "
        f"(activation checkpointing {m['activation_checkpointing']}, loss {m['loss_impl']}; "
        f"{m['activations_per_micro_batch_selective']:.2f} selective, "
        f"{m['activations_per_micro_batch_checkpointed']:.2f} full)",
        f"at micro-batch {m['micro_batch_size']}: {m['total']:.1f} GB ({m['total_checkpointed']:.1f} GB checkpointed)"
        + (f" of {m['capacity']:.0f} GB usable" if m["capacity"] else ""),
        f"largest micro-batch that fits: {p['largest_micro_batch']['no_checkpointing']} "
        f"({p['largest_micro_batch']['selective_checkpointing']} with selective, "
        f"{p['largest_micro_batch']['full_checkpointing']} with full activation checkpointing)",
    ]
    if p["gpu_hours"]:
        lines.append(
            f"{p['tokens']:.3g} tokens at MFU {p['mfu']:.0%}: {p['days']:.1f} days, {p['gpu_hours']:,.0f} GPU-hours, "
            f"${p['cost_usd']:,.0f} at ${cfg.price_per_gpu_hour}/GPU-hour"
        )
    return "\n".join(lines)


@hydra.main(config_path="../configs", config_name="plan", version_base="1.3")
def main(raw: DictConfig) -> None:
    with user_errors():
        move_deprecated_keys(raw)
        cfg: PlanConfig = to_object_strict(raw)
        p = plan(cfg)
    print(render(cfg, p))
    print(json.dumps(p))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
