"""`torchrun --nproc_per_node 2 -m tests.train.checkpoint.hf_zero3_worker HF_DIR [HF_DIR...]`: init.from_hf under
ZeRO-3 on two real ranks (gloo). For each base: the model is built partitioned (zero.Init), each rank fills only its
partitions; then every parameter, gathered, must equal a single-process load, and each rank must have read about
half the elements, never the whole model. Prints "OK" on rank 0 when every check passed."""

from __future__ import annotations

import sys

import torch
import torch.distributed as dist


def main(dirs: list[str]) -> None:
    import deepspeed

    from model.config import ExecutionConfig
    from model.hf import load_hf_state_dict
    from tokenizer.hf_tokenizer import load_any
    from train.checkpoint import init_from_hf
    from train.config import DeepSpeedConfig, InitConfig, OptimConfig
    from train.engine import zero_load
    from train.engine.deepspeed_engine import deepspeed_config
    from train.engine.distributed import init_distributed
    from train.trainer.layout import make_layout

    init_distributed(DeepSpeedConfig(zero_stage=3, backend="gloo"))
    rank = dist.get_rank()
    ds = deepspeed_config(DeepSpeedConfig(zero_stage=3), OptimConfig(), make_layout(256, 64, 2, 2), torch.float32)
    reads = {}
    original = zero_load.load_parameters

    def counting(module, read):
        reads["n"] = original(module, read)
        return reads["n"]

    zero_load.load_parameters = counting
    for hf_dir in dirs:
        tok = load_any(hf_dir) if _has_tok(hf_dir) else _Tok()
        info = init_from_hf.plan_hf_init(InitConfig(from_hf=hf_dir), _user_model(), tok, hf_dir)
        module = init_from_hf.build_from_hf(info, ExecutionConfig(), None, ds)
        reference = load_hf_state_dict(info.sources())
        total = sum(p.ds_numel for p in module.parameters())
        for name, p in module.named_parameters():
            assert hasattr(p, "ds_id"), f"{name} is not partitioned"
            with deepspeed.zero.GatheredParameters([p]):
                assert torch.equal(p.data, reference[name].to(p.dtype)), f"{hf_dir}: {name} differs"
        n = torch.tensor([reads["n"]])
        both = [torch.zeros_like(n) for _ in range(2)]
        dist.all_gather(both, n)
        # Each rank reads its own half (the rows its flat partition spans); the two halves cover the model once
        # plus at most one straddling row per tensor and rank. Buffers (router biases) are read whole and not
        # counted here.
        assert all(int(x) < 0.75 * total for x in both), (both, total)
        assert sum(int(x) for x in both) == total, (both, total)
        if rank == 0:
            print(f"{hf_dir}: elements read per rank {[int(x) for x in both]} of {total}", flush=True)
    dist.barrier()
    if rank == 0:
        print("OK", flush=True)


class _Tok:
    """A tokenizer stand-in for bases made without one: a vocabulary that fits any base."""

    vocab_size = 1

    def extension(self):
        return None


def _has_tok(hf_dir: str) -> bool:
    from pathlib import Path

    return (Path(hf_dir) / "tokenizer.json").is_file()


def _user_model():
    from model.config import ModelConfig

    return ModelConfig()


if __name__ == "__main__":
    main(sys.argv[1:])
