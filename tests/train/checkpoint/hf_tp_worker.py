"""`torchrun --nproc_per_node 2 -m tests.train.checkpoint.hf_tp_worker HF_DIR [HF_DIR...]`: init.from_hf with
tensor parallelism 2 on two real ranks (gloo), under ZeRO-1 and ZeRO-3. For each base: the model is built sharded
by AutoTP and each rank reads only its slices; every parameter must equal its slice of a single-process load, the
elements a rank read from the safetensors must be exactly those it holds, and the two ranks' slices must tile every
sharded tensor once; after deepspeed.initialize the logits and the first step's loss must equal the single-process
model's (1e-5). Prints "OK" on rank 0 when every check passed.

`--rss DIR [--whole]` (any number of processes, tp = world size): the first run writes a 0.16B-parameter Llama base
to DIR and stops; later runs load it and print each rank's peak RSS before and after loading, and its anonymous
RSS after (BENCHMARKS.md). `--whole`: every rank builds and reads the whole model, as init.from_hf did under tensor
parallelism before (AutoTP then shards it in deepspeed.initialize)."""

from __future__ import annotations

import resource
import sys
from itertools import pairwise
from pathlib import Path

import torch
import torch.distributed as dist

from model.hf import HFWeights
from tests.train.checkpoint.hf_zero3_worker import _has_tok, _Tok, _user_model

READ = {"n": 0}


def count_reads() -> None:
    """Count the elements every safetensors read returns (all of init.from_hf's reads go through these two)."""
    rows, cols = HFWeights.rows, HFWeights.cols

    def counted(read):
        def wrapper(self, key, start, stop):
            out = read(self, key, start, stop)
            READ["n"] += out.numel()
            return out

        return wrapper

    HFWeights.rows, HFWeights.cols = counted(rows), counted(cols)


def check(hf_dir: str, stage: int) -> None:
    from model.config import ExecutionConfig
    from tokenizer.hf_tokenizer import load_any
    from train.checkpoint import init_from_hf
    from train.config import DeepSpeedConfig, InitConfig, OptimConfig, TrainConfig
    from train.engine.deepspeed_engine import build_engine, deepspeed_config
    from train.engine.distributed import Dist
    from train.engine.model_parallel import tensor_parallel_slices
    from train.trainer.layout import make_layout

    rank = dist.get_rank()
    tok = load_any(hf_dir) if _has_tok(hf_dir) else _Tok()
    info = init_from_hf.plan_hf_init(InitConfig(from_hf=hf_dir), _user_model(), tok, hf_dir)
    seq = 32
    layout = make_layout(2 * seq, seq, 2, 1)
    ds = DeepSpeedConfig(zero_stage=stage, backend="gloo")
    # The trainer passes a ZeRO-3 config for zero.Init; under tensor parallelism it is unused (the shards are built).
    ds_config = deepspeed_config(ds, OptimConfig(), layout, torch.float32, tp_size=2) if stage == 3 else None
    READ["n"] = 0
    model = init_from_hf.build_from_hf(info, ExecutionConfig(), None, ds_config, tp_size=2)
    read = READ["n"]
    reference = init_from_hf.build_from_hf(info, ExecutionConfig(), None, None).eval()  # single-process load
    ref = reference.state_dict()

    slices = tensor_parallel_slices(model)
    held = 0
    for name, p in model.named_parameters():
        want = ref[name]
        if name in slices:
            dim, a, b = slices[name]
            want = want.narrow(dim, a, b - a)
        assert torch.equal(p.data, want), f"{hf_dir}: {name} differs from its slice of a single-process load"
        held += p.numel()
    state = model.state_dict(keep_vars=True)
    held += sum(b.numel() for n, b in model.named_buffers() if n in state)
    assert read == held, f"{hf_dir}: rank {rank} read {read} elements but holds {held}"
    assert slices, f"{hf_dir}: nothing was sharded"
    # The ranks' slices tile every sharded tensor exactly once: nobody read another rank's part.
    every = [None, None]
    dist.all_gather_object(every, slices)
    for name, (dim, _, _) in slices.items():
        spans = sorted((s[name][1], s[name][2]) for s in every)
        assert spans[0][0] == 0 and spans[-1][1] == ref[name].shape[dim], (hf_dir, name, spans)
        assert all(x[1] == y[0] for x, y in pairwise(spans)), (hf_dir, name, spans)
    total = sum(t.numel() for n, t in ref.items() if not (n == "lm_head.weight" and info.model.tie_embeddings))

    d = Dist(rank=rank, world_size=2, local_rank=rank, local_world_size=2, device=torch.device("cpu"))
    engine, _, _ = build_engine(model, TrainConfig(seq_len=seq, dtype="fp32"), OptimConfig(), ds, layout, d,
                                tp_size=2)  # fmt: skip
    engine.eval()
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, info.model.vocab_size, (2, seq + 1), generator=gen)
    x, y = ids[:, :-1], ids[:, 1:]
    with torch.no_grad():
        got_logits = engine(x).logits
        want_logits = reference(x).logits
        got_loss, want_loss = engine(x, y).ce_loss, reference(x, y).ce_loss
    torch.testing.assert_close(got_logits, want_logits, rtol=0, atol=1e-5, msg=f"{hf_dir}: logits")
    assert abs(got_loss.item() - want_loss.item()) <= 1e-5 * abs(want_loss.item()), (hf_dir, got_loss, want_loss)
    reads = [None, None]
    dist.all_gather_object(reads, read)
    if rank == 0:
        print(f"{hf_dir}, ZeRO-{stage}: elements read per rank {reads} of {total}; loss {got_loss.item():.6f} "
              f"(single process {want_loss.item():.6f})", flush=True)  # fmt: skip


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def rss_anon_gb() -> float:
    """This process's anonymous resident memory now (not the safetensors file pages it has mapped)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) / 2**20
    return float("nan")


def rss(out: str, whole: bool) -> None:
    """Peak RSS of loading a 0.16B-parameter Llama (d 1024, 8 layers, vocabulary 32,000, untied head; 0.64 GB fp32)."""
    import transformers

    from model.config import ExecutionConfig
    from train.checkpoint import init_from_hf
    from train.config import InitConfig

    base = Path(out)
    if not (base / "model.safetensors").is_file():  # written apart: building it would raise this process's peak
        if dist.get_rank() != 0:
            return
        config = transformers.LlamaConfig(vocab_size=32000, hidden_size=1024, intermediate_size=2816,
                                          num_hidden_layers=8, num_attention_heads=16, num_key_value_heads=8,
                                          max_position_embeddings=256, tie_word_embeddings=False,
                                          dtype="float32")  # fmt: skip
        with torch.device("meta"):
            model = transformers.LlamaForCausalLM(config)
        model.to_empty(device="cpu")
        with torch.no_grad():
            for p in model.parameters():
                p.normal_(0, 0.02)
        model.save_pretrained(base, safe_serialization=True)
        print(f"base written to {base}: run again to measure", flush=True)
        return
    info = init_from_hf.plan_hf_init(InitConfig(from_hf=str(base)), _user_model(), _Tok(), str(base))
    before = peak_rss_gb()
    tp = 1 if whole else dist.get_world_size()
    model = init_from_hf.build_from_hf(info, ExecutionConfig(), None, None, tp_size=tp)
    n = sum(p.numel() for p in model.parameters())
    peaks = [None] * dist.get_world_size()
    dist.all_gather_object(peaks, (round(before, 3), round(peak_rss_gb(), 3), round(rss_anon_gb(), 3), n))
    if dist.get_rank() == 0:
        mode = "whole model on every rank" if whole else f"tp {tp}"
        print(f"{mode}: per rank (peak RSS GB before load, after load, anonymous RSS GB after load, parameters held) "
              f"{peaks}", flush=True)  # fmt: skip


def main(argv: list[str]) -> None:
    from train.config import DeepSpeedConfig
    from train.engine.distributed import init_distributed

    torch.set_num_threads(1)
    init_distributed(DeepSpeedConfig(backend="gloo"))
    if argv[0] == "--rss":
        rss(argv[1], "--whole" in argv)
        return
    count_reads()
    for hf_dir in argv:
        for stage in (1, 3):
            check(hf_dir, stage)
    dist.barrier()
    if dist.get_rank() == 0:
        print("OK", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
