"""CPU overhead of Muon's step and of max_attn_logit tracking on model=nano (BENCHMARKS.md, issue 17).

`PYTHONPATH=. python docs/ablation_muon/overhead.py`: forward + backward with tracking off and on, then an AdamW step
and a Muon + AdamW step, interleaved 25 times; medians of the last 20, in ms.
"""

import statistics
import time

import torch

from model.config import ModelConfig
from model.transformer import Transformer
from train.config import OptimConfig
from train.engine.muon import build_muon_optimizer

torch.set_num_threads(1)
torch.manual_seed(0)
cfg = ModelConfig(vocab_size=8192, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden=192)  # model=nano
model = Transformer(cfg)
x = torch.randint(8192, (8, 129))
adamw = torch.optim.AdamW(model.parameters(), lr=1e-3)
muon = build_muon_optimizer(model, OptimConfig(name="muon", lr=1e-3), torch.device("cpu"))
attn = [block.self_attn for block in model.layers]
times: dict[str, list[float]] = {"fwd_bwd": [], "fwd_bwd_tracked": [], "adamw_step": [], "muon_step": []}
for _ in range(25):
    for key in ("fwd_bwd", "fwd_bwd_tracked"):
        for a in attn:
            a.track_max_logit, a.max_logit = key.endswith("tracked"), None
        model.zero_grad()
        start = time.perf_counter()
        model(x[:, :-1], x[:, 1:]).ce_loss.backward()
        times[key].append(time.perf_counter() - start)
    for key, opt in (("adamw_step", adamw), ("muon_step", muon)):
        start = time.perf_counter()
        opt.step()
        times[key].append(time.perf_counter() - start)
med = {k: statistics.median(v[5:]) for k, v in times.items()}
print({k: round(v * 1000, 2) for k, v in med.items()})
tracking = 100 * (med["fwd_bwd_tracked"] / med["fwd_bwd"] - 1)
muon_extra = 100 * (med["muon_step"] - med["adamw_step"]) / med["fwd_bwd"]
print(f"tracking overhead {tracking:.1f}%, muon step - adamw step = {muon_extra:.1f}% of fwd+bwd")
