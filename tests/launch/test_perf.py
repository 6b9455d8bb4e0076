"""launch.plan's step-time model (launch/perf.py) and layout search: communication terms against hand-computed
values, the 1F1B bubble, search ordering, the JSON keys, `out=` recipes composing against the train schema."""

from __future__ import annotations

import json
import math

import pytest
import yaml
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

import train.config  # noqa: F401  registers the train schema
from data_pipeline.cli import to_object_strict
from launch.config import ClusterConfig, cluster_names, load_cluster
from launch.perf import Group, Layout, all_reduce, all_to_all, bubble_fraction, p2p, reduce_scatter, step_time
from launch.plan import Planner, param_counts, plan
from model.config import ModelConfig, MoEConfig
from tests.helpers import REPO, run_module

CONFIGS = REPO / "configs"
SEARCH_ARGS = ("model=tiny", "vocab_size=2048", "gpus=2", "gpu=cpu", "seq_len=256", "global_batch_tokens=8192",
               "tokens=100M", "search=true")  # fmt: skip
"""A small search, planned in process and from the command line."""

NET = ClusterConfig(
    name="t",
    gpus_per_node=8,
    intra_node_gbps=100.0,
    inter_node_gbps=10.0,
    intra_node_latency_us=10.0,
    inter_node_latency_us=20.0,
)


def make(*overrides: str):
    with initialize_config_dir(str(CONFIGS), version_base="1.3"):
        return to_object_strict(compose("plan", overrides=list(overrides)))


def test_collectives_against_hand_computed_times():
    gb = 1e9
    # 8 ranks in one node: ring all-reduce 2 x 7/8 x 1 GB / 100 GB/s + 2 x log2(8) x 10 us
    assert all_reduce(NET, Group(8), gb) == pytest.approx(2 * 7 / 8 * 0.01 + 6 * 10e-6)
    # 16 ranks over two nodes: the network's bandwidth and latency
    assert all_reduce(NET, Group(16), gb) == pytest.approx(2 * 15 / 16 * 0.1 + 8 * 20e-6)
    # data-parallel ranks 8 apart (tp 8): every rank of the group on another node
    assert reduce_scatter(NET, Group(2, stride=8), gb) == pytest.approx(0.5 * 0.1 + 20e-6)
    assert reduce_scatter(NET, Group(4, stride=2), gb) == pytest.approx(3 / 4 * 0.01 + 2 * 10e-6)
    assert reduce_scatter(NET, Group(8), gb, count=10) == pytest.approx(7 / 8 * 0.01 + 10 * 3 * 10e-6)
    # all-to-all over 16 ranks, 8 per node: 7/16 of the bytes on NVLink, 8/16 on the network, at once
    assert all_to_all(NET, Group(16), gb) == pytest.approx(max(7 / 16 * 0.01, 8 / 16 * 0.1) + 2 * 20e-6)
    assert all_to_all(NET, Group(4), gb) == pytest.approx(3 / 4 * 0.01 + 10e-6)
    assert p2p(NET, True, gb) == pytest.approx(0.1 + 20e-6) and p2p(NET, False, gb) == pytest.approx(0.01 + 10e-6)
    assert all_reduce(NET, Group(1), gb) == 0.0


def test_bubble_formula_and_pipeline_step():
    assert bubble_fraction(4, 12) == pytest.approx(3 / 15)
    assert bubble_fraction(1, 8) == 0.0
    cfg = ModelConfig(vocab_size=1024, d_model=256, n_layers=8, n_heads=4, n_kv_heads=2, ffn_hidden=512)
    counts = param_counts(cfg)
    lay = Layout(gpus=8, pp=4, zero_stage=1, micro_batch_size=1)  # dp 2
    t = step_time(cfg, counts, lay, NET, seq_len=256, global_batch_tokens=256 * 24)
    m = t["micro_batches"]
    assert m == 12
    parts = t["parts_s"]
    stage_work = sum(parts[k] for k in ("matmul_dense", "matmul_experts", "elementwise", "pipeline_p2p"))
    assert t["bubble_s"] == pytest.approx((4 - 1) / m * stage_work)
    # without communication and optimizer, the bubble is (pp - 1) / (m + pp - 1) of the step
    assert t["bubble_s"] / (stage_work + t["bubble_s"]) == pytest.approx(bubble_fraction(4, m))
    # p2p: one (tokens, d) activation forward and one gradient backward per micro-batch, inside the node
    assert parts["pipeline_p2p"] == pytest.approx(m * 2 * p2p(NET, False, 256 * 256 * 2))


def test_tensor_sequence_and_expert_parallel_terms():
    dense = ModelConfig(vocab_size=1024, d_model=256, n_layers=4, n_heads=4, n_kv_heads=2, ffn_hidden=512)
    counts = param_counts(dense)
    seq, mb = 256, 2
    tokens = seq * mb
    t = step_time(dense, counts, Layout(2, tp=2, micro_batch_size=mb), NET, seq, tokens)
    # 2 all-reduces per layer forward + 2 backward of the (tokens, d) bf16 activations, + 3 (embedding, loss)
    one = all_reduce(NET, Group(2), tokens * 256 * 2)
    assert t["parts_s"]["tensor_parallel"] == pytest.approx((4 * 4 + 3) * one)
    full = step_time(
        dense, counts, Layout(2, tp=2, micro_batch_size=mb, activation_checkpointing="full"), NET, seq, tokens
    )
    assert full["parts_s"]["tensor_parallel"] == pytest.approx((4 * 6 + 3) * one)  # recompute replays forward
    t = step_time(dense, counts, Layout(2, sp=2, micro_batch_size=mb), NET, seq, tokens)
    # Ulysses: q, k, v and the output exchanged forward and backward, for each rank's tokens / sp
    widths = 2 * 4 * 64 + 2 * 2 * 64
    assert t["parts_s"]["sequence_parallel"] == pytest.approx(
        4 * 2 * all_to_all(NET, Group(2), tokens / 2 * widths * 2)
    )
    moe = ModelConfig(
        vocab_size=1024,
        d_model=256,
        n_layers=4,
        n_heads=4,
        n_kv_heads=2,
        ffn_hidden=512,
        moe=MoEConfig(enabled=True, n_routed_experts=8, top_k=2, ffn_hidden=128, first_k_dense=1),
    )
    t = step_time(moe, param_counts(moe), Layout(4, ep=4, micro_batch_size=mb), NET, seq, tokens * 4)
    # dispatch + combine of tokens x top_k x d, forward and backward, plus the split sizes, per MoE layer (3)
    dispatch = all_to_all(NET, Group(4), tokens * 2 * 256 * 2)
    sizes = all_to_all(NET, Group(4), 8 * 4)
    assert t["parts_s"]["expert_parallel"] == pytest.approx(3 * 2 * (2 * dispatch + sizes))
    hidden = step_time(
        moe, param_counts(moe), Layout(4, ep=4, micro_batch_size=mb), NET, seq, tokens * 4, ep_overlap=1.0
    )
    assert hidden["parts_s"]["expert_parallel"] == 0.0


def test_overlaps_sustained_peak_and_fp8_recipes():
    """tp_overlap hides tensor-parallel collectives; sustained_peak slows only the FLOP-bound parts; block-scaled
    fp8 GEMMs run at the cluster's fp8 curve, tensorwise ones at the bf16 curve's share of the fp8 peak."""
    import dataclasses

    cfg = ModelConfig(vocab_size=1024, d_model=1024, n_layers=4, n_heads=8, n_kv_heads=8, ffn_hidden=4096)
    counts = param_counts(cfg)
    lay, seq = Layout(2, tp=2, micro_batch_size=2), 1024
    h800 = load_cluster("h800")
    base = step_time(cfg, counts, lay, h800, seq, seq * 2)["parts_s"]
    half = step_time(cfg, counts, lay, h800, seq, seq * 2, tp_overlap=0.5)["parts_s"]
    assert base["tensor_parallel"] > 0 and half["tensor_parallel"] == pytest.approx(base["tensor_parallel"] / 2)
    assert step_time(cfg, counts, lay, h800, seq, seq * 2, tp_overlap=1.0)["parts_s"]["tensor_parallel"] == 0.0
    slow = step_time(cfg, counts, lay, dataclasses.replace(h800, sustained_peak=0.5), seq, seq * 2)["parts_s"]
    assert slow["matmul_dense"] == pytest.approx(2 * base["matmul_dense"])
    assert slow["elementwise"] == pytest.approx(base["elementwise"])  # memory-bound: clocks do not matter here

    big = ModelConfig(vocab_size=1024, d_model=4096, n_layers=2, n_heads=32, n_kv_heads=8, ffn_hidden=16384)

    def matmul(cluster=h800, **kw) -> float:
        t = step_time(big, param_counts(big), Layout(1, micro_batch_size=2), cluster, 4096, 8192, **kw)
        return t["parts_s"]["matmul_dense"]

    # 1.1 TFLOP GEMMs: block scaling costs fp8 some of its gain, but fp8 still beats bf16 (not so at small GEMMs)
    bf16, tensorwise, blockwise = matmul(), matmul(fp8=True), matmul(fp8=True, fp8_recipe="blockwise")
    assert tensorwise < blockwise < bf16
    no_curve = dataclasses.replace(h800, efficiency_fp8_blockwise=None)
    assert matmul(no_curve, fp8=True, fp8_recipe="blockwise") == pytest.approx(tensorwise)
    with pytest.raises(ValueError, match="fp8_recipe=rowwise"):
        make("model=tiny", "fp8_recipe=rowwise")
    with pytest.raises(ValueError, match="tp_overlap=2"):
        make("model=tiny", "tp_overlap=2")


def test_cpu_ranks_share_the_cores():
    """On the cpu preset (2 cores) 4 ranks get half a core each: the same matmul seconds as 2 ranks with twice the
    tokens each, twice the fixed overheads, and a pipeline bubble that gives the idle ranks' cores to the others."""
    cpu = load_cluster("cpu")
    assert cpu.shared_compute and cpu.cores == 2
    cfg = ModelConfig(vocab_size=1024, d_model=256, n_layers=4, n_heads=4, n_kv_heads=2, ffn_hidden=512)
    counts = param_counts(cfg)
    two = step_time(cfg, counts, Layout(2, zero_stage=1, micro_batch_size=2), cpu, 256, 1024)
    four = step_time(cfg, counts, Layout(4, zero_stage=1, micro_batch_size=1), cpu, 256, 1024)
    assert four["parts_s"]["matmul_dense"] == pytest.approx(two["parts_s"]["matmul_dense"], rel=0.05)
    overhead = cpu.step_overhead_s + cpu.micro_step_overhead_s  # one micro-step per step in both
    assert two["parts_s"]["overhead"] == pytest.approx(overhead)
    assert four["parts_s"]["overhead"] == pytest.approx(2 * overhead)
    pp = step_time(cfg, counts, Layout(4, pp=2, zero_stage=1, micro_batch_size=1), cpu, 256, 1024)
    m = pp["micro_batches"]
    work = sum(pp["parts_s"][k] for k in ("matmul_dense", "elementwise", "pipeline_p2p")) / m
    assert pp["bubble_s"] == pytest.approx((2 - 1) * work * 0.5)  # half a core each: the bubble is half reclaimed
    assert pp["parts_s"]["overhead"] == pytest.approx((cpu.step_overhead_s + (m + 1) * cpu.micro_step_overhead_s) * 2)


def test_zero_stages_communication():
    cfg = ModelConfig(vocab_size=1024, d_model=256, n_layers=4, n_heads=4, n_kv_heads=2, ffn_hidden=512)
    counts = param_counts(cfg)
    seq = 256
    n = counts["total"]

    def dp(stage: int, accum: int = 1) -> float:
        t = step_time(cfg, counts, Layout(8, zero_stage=stage), NET, seq, seq * 8 * accum)
        return t["parts_s"]["data_parallel"]

    assert dp(0) == pytest.approx(all_reduce(NET, Group(8), n * 2))
    assert dp(1) == pytest.approx(reduce_scatter(NET, Group(8), n * 2))
    assert dp(1, accum=4) == pytest.approx(dp(1))  # ZeRO-1 reduces once per step
    assert dp(2, accum=4) == pytest.approx(4 * dp(2))  # ZeRO-2 after every micro-batch
    z3 = 2 * reduce_scatter(NET, Group(8), n * 2, counts["tensors"]) + reduce_scatter(NET, Group(8), n * 2)
    assert dp(3) == pytest.approx(z3)


def test_every_cluster_preset_loads():
    names = cluster_names()
    assert {"h100", "h200", "h800", "a100", "b200", "cpu"} <= set(names)
    for name in names:
        c = load_cluster(name)
        assert c.name == name and c.efficiency
    with pytest.raises(ValueError, match="gpu=tpu"):
        load_cluster("tpu")


def test_search_lists_accepted_layouts_cheapest_first():
    cfg = make(
        "model=tiny",
        "vocab_size=2048",
        "gpus=4",
        "gpu=cpu",
        "seq_len=256",
        "global_batch_tokens=16384",
        "tokens=1B",
        "search=true",
        "search_top=50",
    )
    p = plan(cfg)
    rows = p["search"]
    assert rows and p["layouts_considered"] >= len(rows)
    hours = [r["gpu_hours"] for r in rows]
    assert hours == sorted(hours)
    assert p["layout"] == rows[0]["layout"] and p["gpu_hours"] == pytest.approx(rows[0]["gpu_hours"])
    planner = Planner(cfg)
    for r in rows:
        lay = r["layout"]
        assert sum(lay[k] > 1 for k in ("tp_size", "sp_size", "pp_size")) <= 1  # the trainer's composition rule
        assert not (lay["tp_size"] > 1 and lay["zero_stage"] == 0)
        assert r["memory_gb_per_gpu"] <= planner.capacity / 1e9
    kinds = {(r["layout"]["tp_size"], r["layout"]["sp_size"]) for r in rows}
    assert len(kinds) > 1  # tensor or sequence parallel layouts are considered, not only data parallel


def test_given_layout_refused_by_the_trainer_is_flagged():
    p = plan(
        make(
            "model=tiny",
            "vocab_size=2048",
            "gpus=4",
            "gpu=cpu",
            "seq_len=256",
            "parallel.tp_size=2",
            "deepspeed.zero_stage=0",
            "micro_batch_size=1",
            "global_batch_tokens=1024",
        )
    )
    assert "zero_stage=0" in p["trainer_refusal"]
    # DeepSeek-V3 in 32 stages: stage 0 holds layers 0 and 1, both dense (first_k_dense=3); with expert parallelism
    # every stage needs experts, so the search never lists it either
    v3 = ("model=deepseek_v3", "vocab_size=129280", "gpus=2048", "gpu=h800", "seq_len=4096", "micro_batch_size=1",
          "global_batch_tokens=62914560", "deepspeed.zero_stage=1", "parallel.ep_size=8")  # fmt: skip
    p = plan(make(*v3, "parallel.pp_size=32"))
    assert "pipeline stage 0 holds decoder layers [0, 1], none of them MoE" in p["trainer_refusal"]
    assert plan(make(*v3, "parallel.pp_size=16"))["trainer_refusal"] is None


def test_json_keys_and_out_recipe_compose_in_process(tmp_path):
    """The plan's JSON keys, and the experiment config `out=` writes composing against the train schema."""
    from launch.plan import experiment_yaml

    cfg = make(*SEARCH_ARGS)
    p = json.loads(json.dumps(plan(cfg)))  # the CLI's last line
    for key in ("step_time_s", "comm_s", "bubble_s", "tokens_per_s_per_gpu", "mfu", "gpu_hours", "layout", "search"):
        assert key in p, key
    (tmp_path / "experiment").mkdir()
    (tmp_path / "experiment" / "planned.yaml").write_text(experiment_yaml(cfg, p, "tiny", "python -m launch.plan ..."))
    with initialize_config_dir(str(CONFIGS), version_base="1.3"):
        raw = compose("train", overrides=["experiment=planned", f"hydra.searchpath=[file://{tmp_path}]", "run.dir=x"])
    train = OmegaConf.to_object(raw)
    assert train.parallel.tp_size == p["layout"]["tp_size"] and train.deepspeed.zero_stage == p["layout"]["zero_stage"]
    assert train.train.micro_batch_size == p["layout"]["micro_batch_size"]


def test_fit_efficiency_recovers_the_elementwise_traffic(tmp_path):
    """Records the cluster model itself produced (train.bench lines) are fitted back to its parameters."""
    import dataclasses

    from launch.fit_efficiency import _predict, fit, load_records

    lines = []
    for model, mb, comp in (("llama_1b", 2, False), ("llama_1b", 4, False), ("llama_1b", 4, True), ("tiny", 8, True)):
        lines.append(
            {
                "impl": "hangang",
                "model": model,
                "seq_len": 1024,
                "micro_batch_size": mb,
                "compile": comp,
                "activation_checkpointing": "none",
                "loss_impl": "torch",
                "tokens_per_s": 1.0,
            }
        )
    bench = tmp_path / "bench.jsonl"
    bench.write_text("\n".join(json.dumps(r) for r in lines))
    truth = load_cluster("h100")
    records = load_records([str(bench)], str(CONFIGS / "cluster" / "h100.yaml"))
    records = [(label, plan_cfg, _predict(truth, plan_cfg)["step_time_s"]) for label, plan_cfg, _ in records]
    start = dataclasses.replace(truth, elementwise_passes=1.0, elementwise_passes_compiled=1.0)
    fitted = fit(start, records, fit_overhead=False)
    assert fitted.elementwise_passes == pytest.approx(truth.elementwise_passes, rel=1e-3)
    assert fitted.elementwise_passes_compiled == pytest.approx(truth.elementwise_passes_compiled, rel=1e-3)


def test_fit_efficiency_reads_the_architecture_train_bench_timed(tmp_path):
    """A train.bench line carries its model config, command-line overrides included: the planner is given the
    architecture that was timed (here MTP off and an 8K vocabulary, which deepseek_tiny.yaml does not say)."""
    from launch.fit_efficiency import load_records

    proc = run_module("train.bench", "model=deepseek_tiny", "model.mtp.depth=0", "model.vocab_size=8192",
                      "bench.steps=1", "bench.warmup=0", "bench.seq_len=64", "bench.micro_batch_size=2",
                      "bench.peer=false")  # fmt: skip
    bench = tmp_path / "bench.jsonl"
    bench.write_text(proc.stdout.strip().splitlines()[-1])
    [(_label, plan_cfg, seconds)] = load_records([str(bench)], str(CONFIGS / "cluster" / "cpu.yaml"))
    assert (plan_cfg.model.mtp.depth, plan_cfg.model.vocab_size, plan_cfg.model.name) == (0, 8192, "deepseek_tiny")
    assert (plan_cfg.seq_len, plan_cfg.micro_batch_size) == (64, 2) and seconds > 0


def test_fit_efficiency_recovers_the_cpu_overheads_and_latency():
    """Step times the cpu preset itself predicts for 1, 2 and 4 ranks with 1 to 4 micro-steps are fitted back to its
    elementwise traffic, per-step and per-micro-step overheads and collective latency."""
    import dataclasses

    from launch.fit_efficiency import _predict, fit

    truth = load_cluster("cpu")
    records = []
    for gpus, mb, tokens, extra in (
        (1, 4, 1024, ()),
        (1, 1, 1024, ()),
        (1, 8, 2048, ()),
        (2, 2, 1024, ("deepspeed.zero_stage=1",)),
        (2, 4, 1024, ("deepspeed.zero_stage=1", "parallel.tp_size=2")),
        (4, 1, 1024, ("deepspeed.zero_stage=1",)),
    ):
        cfg = make("model=tiny", "vocab_size=8192", "gpu=cpu", f"gpus={gpus}", "seq_len=256", f"micro_batch_size={mb}",
                   f"global_batch_tokens={tokens}", "deepspeed.zero_stage=0", *extra)  # fmt: skip
        records.append((f"{gpus} {mb}", cfg, _predict(truth, cfg)["step_time_s"]))
    start = dataclasses.replace(truth, elementwise_passes=1.0, step_overhead_s=0.0, micro_step_overhead_s=0.0)
    start = dataclasses.replace(start, intra_node_latency_us=1.0, inter_node_latency_us=1.0)
    fitted = fit(start, records, fit_overhead=True, fit_latency=True, fit_micro_overhead=True)
    assert fitted.elementwise_passes == pytest.approx(truth.elementwise_passes, rel=1e-2)
    assert fitted.step_overhead_s == pytest.approx(truth.step_overhead_s, rel=1e-2)
    assert fitted.micro_step_overhead_s == pytest.approx(truth.micro_step_overhead_s, rel=1e-2)
    assert fitted.intra_node_latency_us == pytest.approx(truth.intra_node_latency_us, rel=1e-2)


@pytest.mark.slow  # launches the CLI in a subprocess
def test_cli_json_keys_and_out_recipe_composes(tmp_path):
    out = tmp_path / "experiment" / "planned.yaml"
    proc = run_module("launch.plan", *SEARCH_ARGS, f"out={out}")
    p = json.loads(proc.stdout.strip().splitlines()[-1])
    for key in ("step_time_s", "comm_s", "bubble_s", "tokens_per_s_per_gpu", "mfu", "gpu_hours", "layout"):
        assert key in p, key
    assert p["step_time_s"] == pytest.approx(p["compute_s"] + p["comm_s"] + p["bubble_s"])
    text = out.read_text()
    assert text.startswith("# @package _global_") and "# slurm: nodes=1 gpus_per_node=2" in text
    with initialize_config_dir(str(CONFIGS), version_base="1.3"):
        cfg = compose("train", overrides=["experiment=planned", f"hydra.searchpath=[file://{tmp_path}]", "run.dir=x"])
    train = OmegaConf.to_object(cfg)
    lay = p["layout"]
    assert train.parallel.tp_size == lay["tp_size"] and train.parallel.sp_size == lay["sp_size"]
    assert train.deepspeed.zero_stage == lay["zero_stage"]
    assert train.train.micro_batch_size == lay["micro_batch_size"] and train.train.seq_len == 256
    assert train.execution.activation_checkpointing == lay["activation_checkpointing"]
    assert train.train.max_steps == math.ceil(100e6 / 8192)


RECIPES = sorted((CONFIGS / "experiment").glob("*.yaml"))


@pytest.mark.parametrize(
    "path", [p for p in RECIPES if "Written by: python -m launch.plan" in p.read_text()], ids=lambda p: p.stem
)
def test_planned_recipes_compose_and_match_their_header(path):
    """Each shipped recipe was written by launch.plan: it composes against the train schema, its slurm header
    matches its layout, and the layout is one the trainer accepts."""
    text = path.read_text()
    header = dict(kv.split("=") for kv in text.split("# slurm: ", 1)[1].splitlines()[0].split())
    body = yaml.safe_load(text)
    with initialize_config_dir(str(CONFIGS), version_base="1.3"):
        cfg = OmegaConf.to_object(compose("train", overrides=[f"experiment={path.stem}", "run.dir=x"]))
    gpus_per_node = int(header["gpus_per_node"])
    assert int(header["nodes"]) >= 1 and gpus_per_node >= 1
    assert cfg.parallel.tp_size == body["parallel"]["tp_size"] and cfg.train.micro_batch_size >= 1
    from train.trainer.parallel import ParallelLayout

    world = int(header["nodes"]) * gpus_per_node
    par = cfg.parallel
    ep = par.ep_size if cfg.model.moe.enabled else 1
    ParallelLayout(world, par.tp_size, par.sp_size, par.pp_size, ep).check(
        cfg.model if cfg.model.vocab_size else ModelConfig(**{**vars(cfg.model), "vocab_size": 128000}),
        cfg.train.seq_len,
        cfg.deepspeed.zero_stage,
    )
