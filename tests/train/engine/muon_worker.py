"""`torchrun --nproc_per_node N -m tests.train.engine.muon_worker STAGE [EP [rows|tp|tp,rows|slice]]`: Muon under
DeepSpeed ZeRO-STAGE on N real ranks (2 unless `tp`; expert-parallel degree EP, default 1) against a single-process
reference implementation.

Both start from the same weights; each step the DeepSpeed job trains on rank r's micro-batch, the reference on both
micro-batches (mean loss), clips the full gradient and applies a plain per-matrix Muon (fp32 Newton-Schulz, written
here independently of train/engine/muon.py) and torch's AdamW. After every step the full weights (experts gathered)
must agree to 1e-5. The model is DeepSeek-style (MLA, shared + routed experts, MTP) with an untied output head, so
every kind of parameter is exercised. Prints "OK STAGE EP" on rank 0.

`rows`: instead, QK-clip's row scaling of a query and a key weight reaches ZeRO's fp32 master copy ("OK rows STAGE EP").

`tp`: tensor parallelism of degree 2 (AutoTP; EP must be 1; N = 2 or 4, data-parallel N / 2): a rank holds a slice
of the attention and dense/shared-expert MLP matrices, which must still be orthogonalized whole ("OK tp STAGE N";
Newton-Schulz of a slice alone fails the comparison at the first step). `tp,rows`: the row check, each rank scaling
the rows of its slices ("OK rows STAGE EP"). `slice`: one matrix split over the N ranks by rows, then by columns,
so all but one rank orthogonalize nothing ("OK slice N").
"""

from __future__ import annotations

import math
import sys

import torch
import torch.distributed as dist

STEPS = 4
LR, WD = 2e-2, 0.1


def model_config():
    from model.config import ModelConfig, MoEConfig, MTPConfig

    moe = MoEConfig(enabled=True, n_routed_experts=4, top_k=2, ffn_hidden=16, n_shared_experts=1, first_k_dense=1)
    return ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=2, n_kv_heads=2, ffn_hidden=48,
                       attention="mla", q_lora_rank=24, kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8,
                       v_head_dim=8, tie_embeddings=False, moe=moe, mtp=MTPConfig(depth=1))  # fmt: skip


def loss_of(out):
    return out.ce_loss + 0.3 * out.mtp_losses.mean()


def ns(g: torch.Tensor, steps: int = 5) -> torch.Tensor:
    """Reference Newton-Schulz of one matrix (torch.optim.Muon's, in fp32)."""
    a, b, c = 3.4445, -4.7750, 2.0315
    x = g.T if g.size(0) > g.size(1) else g
    x = x / x.norm().clamp(min=1e-7)
    for _ in range(steps):
        A = x @ x.T
        x = a * x + (b * A + c * A @ A) @ x
    return x.T if g.size(0) > g.size(1) else x


class ReferenceMuon:
    """Per-matrix Muon on whole parameters; `views(name, p)` gives the 2-D matrices of a parameter."""

    def __init__(self, named):
        self.named, self.bufs = named, {n: torch.zeros_like(p) for n, p in named}

    @staticmethod
    def views(name, t):
        if name.endswith("experts.gate_up_proj"):
            E, two_h, d = t.shape
            return list(t.view(E * 2, two_h // 2, d))
        if name.endswith("experts.down_proj"):
            return list(t)
        return [t]

    @torch.no_grad()
    def step(self):
        for name, p in self.named:
            buf = self.bufs[name]
            buf.lerp_(p.grad, 1 - 0.95)
            u = p.grad.lerp(buf, 0.95)
            p.mul_(1 - LR * WD)
            for w, m in zip(self.views(name, p), self.views(name, u), strict=True):
                w.add_(ns(m), alpha=-LR * 0.2 * math.sqrt(max(m.shape)))


def check_row_scaler(engine, ref_state: dict, tp: int) -> None:
    """QK-clip's weight edit under ZeRO: scale some rows of a query and a key weight, take a step with a negligible
    learning rate: the weights after the step (copied from ZeRO's fp32 masters) are the scaled ones. Under tensor
    parallelism (column-parallel weights) a rank scales the rows of its slice."""
    from train.engine.deepspeed_engine import full_state_dict
    from train.engine.muon import row_scaler

    scale = row_scaler(engine)
    attn = engine.module.layers[1].self_attn
    edits = {"layers.1.self_attn.q_b_proj.weight": attn.q_b_proj.weight,
             "layers.1.self_attn.kv_b_proj.weight": attn.kv_b_proj.weight}  # fmt: skip
    want = dict(ref_state)
    for name, param in edits.items():
        rows = torch.ones(want[name].shape[0])
        rows[3:7] = torch.tensor([0.5, 0.25, 2.0, 0.125])
        scale(param, rows.chunk(tp)[dist.get_rank() % tp])
        want[name] = want[name] * rows[:, None]
    for group in engine.optimizer.param_groups:
        group["lr"] = 1e-12
    x = torch.randint(64, (2, 17), generator=torch.Generator().manual_seed(2))  # the same on every rank
    engine.backward(loss_of(engine(x[:, :-1], x[:, 1:])))
    engine.step()
    full = full_state_dict(engine)
    if dist.get_rank() == 0:
        for name, t in want.items():
            torch.testing.assert_close(full[name], t, rtol=1e-6, atol=1e-7, msg=name)


def check_one_slice() -> None:
    """MuonAdamW on a single tensor-parallel slice per rank (no ZeRO): the rank that orthogonalizes the whole matrix
    returns each rank its slice of the single-process update."""
    from train.config import MuonConfig, OptimConfig
    from train.engine.deepspeed_compat import TPShard
    from train.engine.muon import MuonAdamW

    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    w, g = torch.randn(4 * world, 6 * world), torch.randn(4 * world, 6 * world)
    optim = OptimConfig(name="muon", lr=LR, weight_decay=WD, muon=MuonConfig(ns_dtype="fp32"))
    # The first Nesterov direction is a multiple of g, and Newton-Schulz normalizes its input.
    want = w * (1 - LR * WD) - LR * 0.2 * math.sqrt(max(w.shape)) * ns(g)
    for dim in (0, 1):
        n = w.shape[dim] // world
        p = torch.nn.Parameter(w.narrow(dim, rank * n, n).clone())
        p.grad = g.narrow(dim, rank * n, n).clone()
        opt = MuonAdamW([{"params": [p], "use_muon": True}], {id(p): (1, *p.shape)}, optim, torch.float32)
        opt.bind_tensor_parallel({id(p): TPShard(None, world, rank, dim, w.shape)})
        opt.step()
        torch.testing.assert_close(p.data, want.narrow(dim, rank * n, n), rtol=1e-5, atol=1e-6, msg=f"dim {dim}")


def main() -> None:
    import deepspeed

    from model.config import ExecutionConfig
    from model.transformer import Transformer
    from train.config import DeepSpeedConfig, MuonConfig, OptimConfig, TrainConfig
    from train.engine.deepspeed_engine import build_engine, full_state_dict
    from train.engine.distributed import Dist
    from train.engine.muon import split_params
    from train.trainer.build import build_model
    from train.trainer.layout import make_layout

    stage, ep = int(sys.argv[1]), int(sys.argv[2]) if len(sys.argv) > 2 else 1
    modes = set(sys.argv[3].split(",")) if len(sys.argv) > 3 else set()
    deepspeed.init_distributed(dist_backend="gloo", verbose=False)
    rank, world = dist.get_rank(), dist.get_world_size()
    if "slice" in modes:
        check_one_slice()
        dist.barrier()
        if rank == 0:
            print(f"OK slice {world}", flush=True)
        dist.destroy_process_group()
        return
    tp = 2 if "tp" in modes else 1
    dp = world // tp
    cfg = model_config()
    optim = OptimConfig(name="muon", lr=LR, weight_decay=WD, warmup_steps=0, schedule="constant",
                        muon=MuonConfig(ns_dtype="fp32"))  # fmt: skip
    model = build_model(cfg, ExecutionConfig(), ep_size=ep, seed=0, zero_stage=stage)
    micro = 4 // dp  # 4 sequences of 16 tokens per step, split over the data-parallel ranks
    train = TrainConfig(seq_len=16, global_batch_tokens=64, micro_batch_size=micro, max_steps=STEPS)
    d = Dist(rank, world, rank, world, torch.device("cpu"))
    engine, _, _ = build_engine(model, train, optim, DeepSpeedConfig(zero_stage=stage), make_layout(64, 16, micro, dp),
                                d, tp_size=tp)  # fmt: skip

    torch.manual_seed(0)
    ref = Transformer(cfg, ExecutionConfig())  # same seed, same weights, every expert local
    muon_names = {n for n, _, _ in split_params(ref)[0]}
    params = dict(ref.named_parameters())
    ref_muon = ReferenceMuon([(n, params[n]) for n in sorted(muon_names)])
    adam = [p for n, p in params.items() if n not in muon_names]
    ref_adam = torch.optim.AdamW([{"params": [p for p in adam if p.ndim >= 2], "weight_decay": WD},
                                  {"params": [p for p in adam if p.ndim < 2], "weight_decay": 0.0}],
                                 lr=LR, betas=(0.9, 0.95), eps=1e-8, foreach=False)  # fmt: skip
    ref.train()
    first = full_state_dict(engine)
    if rank == 0:
        for name, t in ref.state_dict().items():
            torch.testing.assert_close(first[name], t, rtol=0, atol=0, msg=f"initial {name}")
    if "rows" in modes:
        check_row_scaler(engine, ref.state_dict(), tp)
        dist.barrier()
        if rank == 0:
            print(f"OK rows {stage} {ep}", flush=True)
        dist.destroy_process_group()
        return
    g = torch.Generator().manual_seed(1)
    for step in range(STEPS):
        batch = torch.randint(64, (2, 2, 17), generator=g)  # (data-parallel rank, micro, T+1)
        x = batch.reshape(dp, -1, 17)[rank // tp]  # tensor-parallel groups are consecutive ranks
        engine.backward(loss_of(engine(x[:, :-1], x[:, 1:])))
        engine.step()
        ref.zero_grad()
        loss = sum(loss_of(ref(b[:, :-1], b[:, 1:])) for b in batch) / 2
        loss.backward()
        torch.nn.utils.clip_grad_norm_(ref.parameters(), optim.grad_clip)
        ref_muon.step()
        ref_adam.step()
        full = full_state_dict(engine)
        if rank == 0:
            assert set(full) == set(ref.state_dict()), set(full) ^ set(ref.state_dict())
            for name, t in ref.state_dict().items():
                torch.testing.assert_close(full[name], t, rtol=1e-5, atol=1e-5, msg=f"step {step + 1} {name}")
    dist.barrier()
    if rank == 0:
        print(f"OK tp {stage} {world}" if "tp" in modes else f"OK {stage} {ep}", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
