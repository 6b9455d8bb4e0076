"""QK-clip: the per-head maximum logit the attention modules track, and the rescale of exactly the heads over tau
(a planted large logit), in MHA, GQA and MLA; under ZeRO the same edit reaches the fp32 master weights, also of a
tensor-parallel slice (tests/train/engine/muon_worker.py `rows`, `tp,rows`); a 2-rank pretrain run logs
`max_attn_logit` and clips (under tensor parallelism: tests/train/trainer/test_model_parallel.py)."""

from __future__ import annotations

import json

import pytest
import torch

from model.attention import LogitTracker, eager_causal_attention
from model.config import ModelConfig
from model.transformer import Transformer
from tests.helpers import run_module, train_args
from train.callbacks.qk_clip import clip_heads

CONFIGS = {
    "mha": dict(n_heads=4, n_kv_heads=4),
    "gqa": dict(n_heads=4, n_kv_heads=2),
    "mla": dict(
        n_heads=4,
        n_kv_heads=4,
        attention="mla",
        q_lora_rank=24,
        kv_lora_rank=16,
        qk_rope_head_dim=8,
        qk_nope_head_dim=8,
        v_head_dim=8,
    ),  # fmt: skip
}


def build(kind: str) -> Transformer:
    torch.manual_seed(0)
    return Transformer(ModelConfig(vocab_size=64, d_model=32, n_layers=2, ffn_hidden=48, **CONFIGS[kind])).eval()


def trackers(model):
    return [m for m in model.modules() if isinstance(m, LogitTracker)]


def tracked_maxes(model, x) -> torch.Tensor:
    for m in trackers(model):
        m.track_max_logit, m.max_logit = True, None
    with torch.no_grad():
        out = model(x)
    return torch.stack([m.max_logit for m in trackers(model)]), out


def scale_rows(param, rows):  # no ZeRO: the module weight is the optimizer's parameter
    with torch.no_grad():
        param.mul_(rows.view(-1, 1))


@pytest.mark.parametrize("kind", sorted(CONFIGS))
def test_tracker_is_the_eager_maximum_and_off_by_default(kind):
    model = build(kind)
    x = torch.randint(64, (2, 20))
    with torch.no_grad():
        plain = model(x).logits
    assert all(m.max_logit is None for m in trackers(model))
    maxes, out = tracked_maxes(model, x)
    assert torch.equal(out.logits, plain)  # tracking does not touch the forward's numbers
    attn = model.layers[0].self_attn
    captured = {}

    def grab(q, k, v, scale, mask=None):
        captured["qk"] = (q, k, scale)
        return eager_causal_attention(q, k, v, scale, mask)

    import model.attention as A

    real = A.eager_causal_attention
    attn.backend = "eager"
    A.eager_causal_attention = grab
    try:
        with torch.no_grad():
            model(x)
    finally:
        A.eager_causal_attention = real
    q, k, scale = captured["qk"]
    k = k.repeat_interleave(q.size(1) // k.size(1), dim=1)
    s = (q @ k.transpose(-2, -1)) * scale
    s = s.masked_fill(~torch.ones(20, 20, dtype=torch.bool).tril(), float("-inf"))
    torch.testing.assert_close(maxes[0], s.amax(dim=(0, 2, 3)), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", sorted(CONFIGS))
def test_only_heads_over_tau_are_rescaled(kind):
    model = build(kind)
    attn = model.layers[0].self_attn
    q_weight = attn.q_proj.weight if kind != "mla" else attn.q_b_proj.weight
    rows_per_head = q_weight.shape[0] // 4
    with torch.no_grad():
        q_weight[rows_per_head : 2 * rows_per_head] *= 40.0  # head 1 of layer 0: a planted large logit
    x = torch.randint(64, (2, 20))
    maxes, _ = tracked_maxes(model, x)
    others = torch.cat((maxes[0, [0, 2, 3]], maxes[1]))
    assert maxes[0, 1] > 4 * others.max()
    tau = float(maxes[0, 1] + others.max()) / 2
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    clipped = [clip_heads(m, maxes[i], tau, scale_rows) for i, m in enumerate(trackers(model))]
    assert clipped == [1, 0]
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    expect = {"mha": {"layers.0.self_attn.q_proj.weight", "layers.0.self_attn.k_proj.weight"},
              "gqa": {"layers.0.self_attn.q_proj.weight"},  # keys are shared with head 0: untouched
              "mla": {"layers.0.self_attn.q_b_proj.weight", "layers.0.self_attn.kv_b_proj.weight"}}[kind]  # fmt: skip
    assert changed == expect  # the shared rotary key (kv_a_proj_with_mqa) and everything else bit-identical
    for name in changed:  # only head 1's rows moved
        diff = (model.get_parameter(name) != before[name]).any(dim=1).nonzero().flatten()
        per_head = model.get_parameter(name).shape[0] // 4
        assert diff.min() >= per_head and diff.max() < 2 * per_head, name
    after, _ = tracked_maxes(model, x)
    torch.testing.assert_close(after[0, 1], torch.tensor(tau), rtol=1e-4, atol=0)  # shrunk to tau exactly
    assert torch.equal(after[0, [0, 2, 3]], maxes[0, [0, 2, 3]])  # (layer 1 sees layer 0's new output)


@pytest.mark.slow
@pytest.mark.parametrize("stage", [1, 3])
def test_row_edit_reaches_zero_master_weights(stage):
    args = ("torchrun", "--standalone", "--nproc_per_node=2", "-m", "tests.train.engine.muon_worker", str(stage), "2",
            "rows")  # fmt: skip
    assert f"OK rows {stage} 2" in run_module(*args, timeout=400).stdout


@pytest.mark.slow
@pytest.mark.parametrize("stage", [1, 3])
def test_row_edit_of_a_tensor_parallel_slice_reaches_zero_master_weights(stage):
    args = ("torchrun", "--standalone", "--nproc_per_node=2", "-m", "tests.train.engine.muon_worker", str(stage), "1",
            "tp,rows")  # fmt: skip
    assert f"OK rows {stage} 1" in run_module(*args, timeout=400).stdout


@pytest.mark.slow
def test_pretrain_logs_max_logit_and_clips(tiny_tokenizer, tiny_data, tmp_path):
    run = tmp_path / "run"
    args = train_args(tiny_tokenizer, tiny_data, run, "optim=muon", "optim.qk_clip.enabled=true",
                      "optim.qk_clip.tau=0.1", "deepspeed.zero_stage=2")  # fmt: skip
    run_module("torchrun", "--standalone", "--nproc_per_node=2", "-m", "train.pretrain", *args, timeout=600)
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [x for x in lines if x.get("step", 0) > 0 and "loss" in x]
    assert all("max_attn_logit" in x and "max_attn_logit/layers.0" in x for x in steps)
    # without clipping this run's first step sees logits up to 0.142 and steps 2-10 average 0.128 (measured)
    assert steps[0]["qk_clipped_heads"] > 0
    later = [x["max_attn_logit"] for x in steps[1:]]
    assert sum(later) / len(later) < 0.115, later  # clipped runs stay near tau (new batches may exceed it a little)
