"""Training-step throughput of our Transformer vs Hugging Face's implementation of the same shape
(LlamaForCausalLM, or DeepseekV3ForCausalLM for MLA models).

    python -m train.bench model=tiny bench.seq_len=256 bench.micro_batch_size=8 bench.steps=10
    python -m train.bench bench.suite=configs/bench_suite/h100_dense.yaml bench.table_out=BENCHMARKS.md

One model: prints one JSON line per model, then a JSON summary (ours, with the peer nested and the speedup) as the
last line. A suite (train/bench_suite.py) runs every variant of a suite file in its own subprocess and writes a
Markdown table. bench.find_max_micro_batch=true searches the largest micro-batch that fits instead.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import time
from collections.abc import Callable

import hydra
import torch
from omegaconf import DictConfig

from data_pipeline.cli import to_object_strict, user_errors
from model.accelerator import (
    default_dtype,
    device_name,
    empty_cache,
    fused_adamw,
    is_accelerator,
    peak_flops,
    peak_memory_gb,
    peak_memory_kind,
    reset_peak_memory,
    resolve_device,
    synchronize,
)
from model.config import ExecutionConfig, ModelConfig
from model.flops import flops_per_token
from model.hf import hf_architecture, hf_config, to_hf_state_dict
from model.output import ModelOutput
from model.transformer import Transformer, num_params
from train.config import BenchConfig, BenchRoot, OptimConfig, move_deprecated_keys
from train.engine.optimize import optimize_model
from train.tools import CONFIGS
from train.tools.bench_suite import find_max_micro_batch, overrides_from_argv, run_suite

HF_ATTN = {"sdpa": "sdpa", "eager": "eager", "flash_attn": "flash_attention_2", "flex": "flex_attention"}


def _reset_peak_mem(device: torch.device) -> float:
    """Start a peak-memory window; returns the baseline (bytes) that `_peak_mem` subtracts."""
    # On CPU the reset restarts the max-RSS mark at the current RSS, so the second model is measured alone; the
    # process's RSS at that point is the baseline. An accelerator's allocator peak starts from zero.
    reset_peak_memory(device)
    return 0.0 if is_accelerator(device) else peak_memory_gb(device) * 2**30


def _peak_mem(device: torch.device, baseline: float) -> float:
    return peak_memory_gb(device) * 2**30 - baseline


def time_training(
    model: torch.nn.Module,
    loss_fn: Callable[[torch.nn.Module], torch.Tensor],
    bc: BenchConfig,
    device: torch.device,
    bf16: bool,
    optim: OptimConfig | None = None,
) -> tuple[float, float]:
    """bc.warmup untimed then bc.steps timed optimizer steps (AdamW; `optim=muon`: Muon + AdamW) on loss_fn(model);
    returns (timed seconds, first loss)."""
    if optim is not None and optim.name == "muon":
        from train.engine.muon import build_muon_optimizer

        opt = build_muon_optimizer(model, dataclasses.replace(optim, lr=1e-4), device)
    else:
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=fused_adamw(device))
    start = first_loss = None
    for i in range(bc.warmup + bc.steps):
        if i == bc.warmup:
            synchronize(device)
            start = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = loss_fn(model)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        first_loss = loss.detach() if first_loss is None else first_loss  # .item() later: no sync while timing
    synchronize(device)
    return time.perf_counter() - start, first_loss.item()


def measure(
    impl: str,
    build: Callable[[], torch.nn.Module],
    loss_fn: Callable[[torch.nn.Module], torch.Tensor],
    cfg: ModelConfig,
    ex: ExecutionConfig,
    bc: BenchConfig,
    device: torch.device,
    bf16: bool,
    optim: OptimConfig | None = None,
) -> dict:
    """Build a model inside a fresh peak-memory window, time it, print and return its JSON record."""
    base = _reset_peak_mem(device)
    model = build()
    seconds, loss = time_training(model, loss_fn, bc, device, bf16, optim)
    tps = bc.micro_batch_size * bc.seq_len * bc.steps / seconds
    result = {
        "impl": impl,
        "device": device_name(device),
        "torch": torch.__version__,
        "model": cfg.name,
        "vocab_size": cfg.vocab_size,
        "model_config": dataclasses.asdict(cfg),  # the architecture timed, command-line overrides included
        "params": num_params(model),
        "seq_len": bc.seq_len,
        "micro_batch_size": bc.micro_batch_size,
        "dtype": "bf16" if bf16 else "fp32",
        "tokens_per_s": round(tps, 1),
        "mfu": round(flops_per_token(cfg, bc.seq_len) * tps / peak_flops(device), 4),
        "peak_mem_gb": round(_peak_mem(device, base) / 1e9, 3),
        "peak_mem_kind": peak_memory_kind(device),
        "first_loss": round(loss, 4),
    }
    if impl == "hangang":
        result.update(
            optim=optim.name if optim is not None else "adamw",
            compile=bc.compile,
            fp8=bc.fp8,
            activation_checkpointing=ex.activation_checkpointing,
            loss_impl=ex.loss_impl,
            kernels=ex.kernels,
            attn_backend=ex.attn_backend,
        )
    print(json.dumps(result), flush=True)
    del model
    gc.collect()
    empty_cache(device)
    return result


def build_ours(
    cfg: ModelConfig, ex: ExecutionConfig, sd: dict[str, torch.Tensor], device: torch.device, bc: BenchConfig
) -> Transformer:
    with torch.device(device):
        model = Transformer(cfg, ex)
    model.load_state_dict(sd, strict=True)
    return optimize_model(model, compile=bc.compile, fp8=bc.fp8)


def build_peer(
    cfg: ModelConfig, attn_backend: str, sd: dict[str, torch.Tensor], device: torch.device
) -> torch.nn.Module:
    """The transformers model of cfg's architecture and shape, matching attention kernel, same initial weights."""
    import transformers

    hf_cfg = hf_config(cfg, bos_id=1, eos_id=2, pad_id=0)
    hf_cfg._attn_implementation = HF_ATTN[attn_backend]
    with torch.device(device):
        model = getattr(transformers, hf_architecture(cfg))(hf_cfg)
    hf_sd = to_hf_state_dict(sd, cfg)
    if cfg.tie_embeddings:
        hf_sd["lm_head.weight"] = hf_sd["model.embed_tokens.weight"]  # listed by the HF state dict even when tied
    model.load_state_dict(hf_sd, strict=True)
    return model


def train_loss(out: ModelOutput) -> torch.Tensor:
    """The training loss of ours: CE + 0.3 * mean MTP loss + 1e-4 * balance losses (the trainer's default weights)."""
    total = out.ce_loss
    if out.mtp_losses is not None:
        total = total + 0.3 * out.mtp_losses.mean()
    if out.aux_losses is not None:
        total = total + 1e-4 * out.aux_losses.sum()
    return total


def run(root: BenchRoot) -> dict:
    """Benchmark ours, then the peer unless bench.peer=false; returns the summary (ours + peer + speedup)."""
    bc = root.bench
    device = resolve_device(bc.device)
    bf16 = bc.dtype == "bf16" or (bc.dtype == "auto" and default_dtype(device) == torch.bfloat16)
    eos = root.model.eos_id if root.model.eos_id >= 0 else 2  # the peer's eos id too
    cfg = dataclasses.replace(root.model, vocab_size=root.model.vocab_size or 32000, eos_id=eos)
    ex = root.execution
    if bc.seq_len > cfg.max_seq_len:
        raise ValueError(f"bench.seq_len={bc.seq_len} exceeds model.max_seq_len={cfg.max_seq_len}")
    torch.manual_seed(bc.seed)
    tokens = torch.randint(cfg.vocab_size, (bc.micro_batch_size, bc.seq_len + 1))
    if bc.doc_len:
        tokens[torch.rand(tokens.shape) < 1.0 / bc.doc_len] = eos
    tokens = tokens.to(device)
    x, y = tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()  # (B, T) each; y already shifted
    # Initial weights drawn once on the CPU, outside both memory windows, and loaded into both models.
    init_sd = Transformer(cfg).state_dict()

    def peer_run() -> dict:
        return measure(
            "transformers",
            lambda: build_peer(cfg, ex.attn_backend, init_sd, device),
            lambda m: m(input_ids=x, labels=y, shift_labels=y).loss,  # shift_labels: y is already shifted
            cfg,
            ex,
            bc,
            device,
            bf16,
        )

    if bc.impl == "transformers":
        return dict(peer_run(), peer=None, speedup=None)
    ours = measure(
        "hangang",
        lambda: build_ours(cfg, ex, init_sd, device, bc),
        lambda m: train_loss(m(x, labels=y)),
        cfg,
        ex,
        bc,
        device,
        bf16,
        root.optim,
    )
    summary = dict(ours, doc_masking=cfg.doc_masking, doc_len=bc.doc_len, peer=None, speedup=None)
    if bc.peer:
        peer = peer_run()
        summary.update(peer=peer, speedup=round(ours["tokens_per_s"] / peer["tokens_per_s"], 3))
    return summary


@hydra.main(config_path=CONFIGS, config_name="bench", version_base="1.3")
def main(cfg: DictConfig) -> None:
    with user_errors():
        move_deprecated_keys(cfg)
        root = to_object_strict(cfg)  # runs the dataclass __post_init__ checks
        if root.bench.suite:
            run_suite(root.bench)
        elif root.bench.find_max_micro_batch:
            print(json.dumps(find_max_micro_batch(overrides_from_argv(), root.bench)), flush=True)
        else:
            print(json.dumps(run(root)), flush=True)


if __name__ == "__main__":
    main()
