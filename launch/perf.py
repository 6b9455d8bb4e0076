"""Step time of one parallel layout on a cluster: compute, exposed communication and the pipeline bubble.

    step = compute + exposed communication + bubble

Compute per rank (its 1 / world of the step's FLOPs, tensor, sequence and pipeline parallelism splitting the work):
- matmuls: FLOPs / (peak x sustained_peak x efficiency(GEMM size)), with the cluster's efficiency curve; the dense part
  (projections, dense MLP, shared experts, output head, attention scores) at the size of the MLP's up-projection
  on this rank (2 x tokens per micro-batch / sp x d_model x ffn / tp), routed experts at the size of one local
  expert's GEMM (tokens x top_k x ep / n_routed_experts rows); with execution.fp8 the decoder's linears at the fp8
  peak (attention scores and the output head stay bf16), at the bf16 curve's share of it (tensorwise scaling) or
  the cluster's block-scaled fp8 curve (`fp8_recipe=blockwise`);
  full activation checkpointing recomputes the decoder's forward (+1/3 of its matmul FLOPs; `recompute_share` of
  the forward's matmuls in general: 0 for this trainer's selective policy, 0.5 for torchtitan's, which recomputes
  every other matmul);
- memory-bound operators: `elementwise_passes` x the bytes a layer saves for backward (MoE layers: plus the
  top_k token copies routed to and from the experts; the loss: logits, fp32 softmax and gradient), over memory
  bandwidth (fitted per cluster, without and with `execution.compile`);
- the optimizer step: 16 B per local parameter read and written (fp32 master, Adam m, v, gradient) over memory
  bandwidth, or over host memory bandwidth and the host link with ZeRO-Offload;
- fixed costs: `step_overhead_s` per step and `micro_step_overhead_s` per micro-step (per pipeline schedule slot).
On CPU (`shared_compute`) ranks beyond the node's `cores` share them: every part above runs at cores / ranks.

Communication per rank and step, ring algorithms (all-reduce 2 (n-1)/n x bytes / bandwidth, reduce-scatter and
all-gather (n-1)/n, all-to-all (n-1)/n split between NVLink and the network by where the group's ranks sit), plus
a latency per collective hop; a group whose ranks span nodes runs at the inter-node bandwidth:
- data parallel (group dp x sp, experts over the expert-data-parallel group dp x sp / ep): ZeRO-0 all-reduces the
  gradients once per step; ZeRO-1 reduce-scatters them once per step and ZeRO-2 after every micro-batch, both
  all-gather the updated weights after the step; ZeRO-3 all-gathers weights in forward and again in backward and
  reduce-scatters gradients, every micro-batch. `comm_overlap` of the gradient reduction and ZeRO-3 gathers hides
  under backward; the post-step weight all-gather never does; ZeRO-3 pays one latency per parameter tensor
  gathered (DeepSpeed fetches each module's parameters separately); every step adds three small collectives over
  all ranks (heartbeat barrier, gradient norm, logged loss);
- tensor parallelism (AutoTP, no sequence-parallel norms): 2 all-reduces of the (tokens, d_model) activations per
  layer in forward and 2 in backward, plus the vocabulary-parallel embedding and loss (`tp_overlap` hidden: 0 in
  this trainer, ~1 with Megatron-Core's --tp-comm-overlap);
- Ulysses: 4 all-to-alls (q, k, v, attention output) per layer in forward and 4 in backward;
- expert parallelism: dispatch and combine all-to-alls of tokens x top_k x d_model per MoE layer, forward and
  backward (`ep_overlap` hidden); full checkpointing replays the forward's TP, Ulysses and EP collectives;
- pipeline: one (tokens, d_model) send per micro-batch forward and one backward at each stage boundary.

Pipeline bubble (1F1B): idle share (pp - 1) / (m + pp - 1) of the step with m micro-batches per step, i.e. the
bubble adds (pp - 1) / m x the per-micro-batch work of a stage (on a CPU whose ranks share cores, x their share:
the idle stage's core works for the others).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from launch.config import ClusterConfig
from model.config import ModelConfig
from model.flops import activated_params

ADAM_BYTES_PER_PARAM = 16  # fp32 master + Adam m and v read and written, gradient read (bytes moved per parameter)


@dataclass(frozen=True)
class Layout:
    """One candidate: the degrees, ZeRO, offload, micro-batch and checkpointing of a run on `gpus` devices."""

    gpus: int
    tp: int = 1
    sp: int = 1
    pp: int = 1
    ep: int = 1
    zero_stage: int = 1
    offload_optimizer: bool = False
    offload_param: bool = False
    micro_batch_size: int = 1
    activation_checkpointing: str = "none"

    @property
    def dp(self) -> int:
        return self.gpus // (self.tp * self.sp * self.pp)

    def as_dict(self) -> dict:
        return {
            "dp": self.dp,
            "tp_size": self.tp,
            "sp_size": self.sp,
            "pp_size": self.pp,
            "ep_size": self.ep,
            "zero_stage": self.zero_stage,
            "offload_optimizer": self.offload_optimizer,
            "offload_param": self.offload_param,
            "micro_batch_size": self.micro_batch_size,
            "activation_checkpointing": self.activation_checkpointing,
        }

    def describe(self) -> str:
        off = "+opt-offload" if self.offload_optimizer else ""
        off += "+param-offload" if self.offload_param else ""
        return (
            f"ZeRO-{self.zero_stage}{off} dp{self.dp} tp{self.tp} sp{self.sp} pp{self.pp} ep{self.ep} "
            f"mb{self.micro_batch_size} AC {self.activation_checkpointing}"
        )


def core_share(c: ClusterConfig, gpus: int) -> float:
    """The share of a compute unit one rank gets: 1 on a GPU; on CPU (`shared_compute`) cores / ranks on the node
    when the ranks outnumber the cores (each rank trains with one thread)."""
    return min(1.0, c.cores / min(gpus, c.gpus_per_node)) if c.shared_compute else 1.0


def rank_peak_flops(c: ClusterConfig, gpus: int) -> float:
    """One rank's bf16 peak FLOP/s: the device's, or on CPU its share of the node's cores."""
    return c.peak_tflops_bf16 * 1e12 * core_share(c, gpus)


def efficiency(cluster: ClusterConfig, gflop: float, blockwise_fp8: bool = False) -> float:
    """The cluster's matmul efficiency at a GEMM of `gflop` GFLOP (log-linear between points, flat outside); with
    `blockwise_fp8` its block-scaled fp8 curve where it has one."""
    pts = cluster.efficiency_fp8_blockwise if blockwise_fp8 and cluster.efficiency_fp8_blockwise else cluster.efficiency
    if gflop <= pts[0][0]:
        return pts[0][1]
    for (x0, y0), (x1, y1) in zip(pts, pts[1:], strict=False):
        if gflop <= x1:
            t = math.log(gflop / x0) / math.log(x1 / x0)
            return y0 + t * (y1 - y0)
    return pts[-1][1]


# Collectives: time for a rank to take part, `nbytes` = the full buffer it contributes (all-reduce, reduce-scatter
# input, all-gather output) or sends (all-to-all, p2p).


@dataclass(frozen=True)
class Group:
    """A process group: `size` ranks `stride` apart (rank = ... + i x stride)."""

    size: int
    stride: int = 1

    def per_node(self, gpus_per_node: int) -> int:
        """Ranks of the group on one node."""
        return max(1, min(self.size, gpus_per_node // self.stride)) if self.stride <= gpus_per_node else 1


def _bw_lat(c: ClusterConfig, g: Group) -> tuple[float, float]:
    if g.per_node(c.gpus_per_node) >= g.size:
        return c.intra_node_gbps * 1e9, c.intra_node_latency_us * 1e-6
    return c.inter_node_gbps * 1e9, c.inter_node_latency_us * 1e-6


def all_reduce(c: ClusterConfig, g: Group, nbytes: float, count: int = 1) -> float:
    """Ring all-reduce: 2 (n-1)/n x bytes over the bus bandwidth, 2 log2(n) latency hops (NCCL trees/rings), for
    each of `count` collectives sharing the bytes."""
    if g.size <= 1 or nbytes <= 0:
        return 0.0
    bw, lat = _bw_lat(c, g)
    return 2 * (g.size - 1) / g.size * nbytes / bw + count * 2 * math.ceil(math.log2(g.size)) * lat


def reduce_scatter(c: ClusterConfig, g: Group, nbytes: float, count: int = 1) -> float:
    """Reduce-scatter (or all-gather) of `nbytes` in `count` collectives: (n-1)/n x bytes, log2(n) hops each."""
    if g.size <= 1 or nbytes <= 0:
        return 0.0
    bw, lat = _bw_lat(c, g)
    return (g.size - 1) / g.size * nbytes / bw + count * math.ceil(math.log2(g.size)) * lat


all_gather = reduce_scatter


def all_to_all(c: ClusterConfig, g: Group, nbytes: float) -> float:
    """All-to-all of `nbytes` per rank: the (local - 1)/n share over NVLink and the (n - local)/n share over the
    network run at once; one latency per peer node plus one."""
    if g.size <= 1 or nbytes <= 0:
        return 0.0
    local = g.per_node(c.gpus_per_node)
    intra = (local - 1) / g.size * nbytes / (c.intra_node_gbps * 1e9)
    inter = (g.size - local) / g.size * nbytes / (c.inter_node_gbps * 1e9)
    nodes = math.ceil(g.size / local)
    lat = c.intra_node_latency_us * 1e-6 if nodes == 1 else c.inter_node_latency_us * 1e-6 * nodes
    return max(intra, inter) + lat


def p2p(c: ClusterConfig, inter_node: bool, nbytes: float) -> float:
    bw = (c.inter_node_gbps if inter_node else c.intra_node_gbps) * 1e9
    lat = (c.inter_node_latency_us if inter_node else c.intra_node_latency_us) * 1e-6
    return nbytes / bw + lat


def bubble_fraction(pp: int, micro_batches: int) -> float:
    """Idle share of a 1F1B pipeline step: (pp - 1) / (micro-batches + pp - 1)."""
    return (pp - 1) / (micro_batches + pp - 1)


def _per_layer_saved(cfg: ModelConfig, layer: int, tp: int, dtype_bytes: int) -> float:
    """Bytes per token a layer saves for backward without checkpointing (the planner's activation model), with
    the head- and hidden-width tensors split by tensor parallelism."""
    d = cfg.d_model
    kv = cfg.n_kv_heads * cfg.head_dim if cfg.attention == "gqa" else cfg.kv_lora_rank + cfg.qk_rope_head_dim
    m = cfg.moe
    if not cfg.is_moe_layer(layer):
        return dtype_bytes * (6 * d + (2 * kv + 4 * cfg.ffn_hidden) / tp)
    f = m.ffn_hidden * (m.top_k + m.n_shared_experts)
    # + routing: each token's top_k copies gathered to their experts and scattered back (input, output, gradients)
    return dtype_bytes * (6 * d + (2 * kv + 4 * f) / tp + 4 * m.top_k * d)


@dataclass(frozen=True)
class _Shape:
    """What every term of one step needs: the model, layout and cluster, and the per-rank work they imply."""

    cfg: ModelConfig
    counts: dict
    L: Layout
    c: ClusterConfig
    seq_len: int
    global_batch_tokens: int

    @property
    def ep(self) -> int:
        return self.L.ep if self.cfg.moe.enabled else 1

    @property
    def act_b(self) -> int:  # activations and communicated tensors
        return 4 if self.c.fp32 else 2

    @property
    def grad_b(self) -> int:  # DeepSpeed reduces gradients in the training dtype
        return 4 if self.c.fp32 else 2

    @property
    def micro_batches(self) -> int:  # per pipeline (= gradient accumulation steps)
        return max(1, self.global_batch_tokens // self.seq_len // (self.L.micro_batch_size * self.L.dp))

    @property
    def tokens_mb(self) -> float:  # tokens a rank's layers see per micro-batch
        return self.L.micro_batch_size * self.seq_len / self.L.sp

    @property
    def layers(self) -> int:
        return self.cfg.n_layers + self.cfg.mtp.depth

    @property
    def share(self) -> float:  # ranks sharing CPU cores share their memory bandwidth and Python time too
        return core_share(self.c, self.L.gpus)

    @property
    def forward_replays(self) -> int:  # full recompute replays the forward's collectives
        return 2 if self.L.activation_checkpointing == "full" else 1

    @property
    def dp_group(self) -> int:  # ZeRO and the gradient reduction span the data- and sequence-parallel ranks
        return self.L.dp * self.L.sp

    @property
    def edp(self) -> int:  # the expert-data-parallel group: the data-parallel group over the expert-parallel one
        return max(1, self.dp_group // self.ep)

    @property
    def dense_params(self) -> float:  # held by a rank before ZeRO sharding: layers split by pp, widths by tp
        return (self.counts["total"] - self.counts["routed_experts"]) / (self.L.tp * self.L.pp)

    @property
    def expert_params(self) -> float:
        return self.counts["routed_experts"] / (self.ep * self.L.pp)


def _matmul_seconds(
    s: _Shape, fp8: bool, fp8_recipe: str, recompute_share: float | None, comm_sm_share: float
) -> tuple[float, float, float]:
    """(dense matmuls, routed experts, the peak used): FLOPs per token split into the decoder's linears, the routed
    experts, the attention scores and the head, each at its GEMM size's efficiency."""
    cfg, L, c = s.cfg, s.L, s.c
    # Compute units left to compute while comm kernels run, at the clocks the device sustains.
    peak = rank_peak_flops(c, L.gpus) * c.sustained_peak * (1 - comm_sm_share)
    fp8 = bool(fp8 and c.peak_tflops_fp8)
    blockwise = fp8 and fp8_recipe == "blockwise"
    peak_mm = peak * c.peak_tflops_fp8 / c.peak_tflops_bf16 if fp8 else peak
    d, moe = cfg.d_model, cfg.moe.enabled
    n_head = d * cfg.vocab_size * (1 + cfg.mtp.depth)
    n_routed = 0
    if moe:
        n_routed = sum(3 * d * cfg.moe.ffn_hidden * cfg.moe.top_k for i in range(s.layers) if cfg.is_moe_layer(i))
    per_head = (
        cfg.qk_nope_head_dim + cfg.qk_rope_head_dim + cfg.v_head_dim if cfg.attention == "mla" else 2 * cfg.head_dim
    )
    f_attn = 6.0 * s.layers * cfg.n_heads * per_head * s.seq_len
    f_dense = 6.0 * (activated_params(cfg) - n_routed - n_head)
    if recompute_share is None:
        recompute_share = 1.0 if L.activation_checkpointing == "full" else 0.0
    recompute = 1 + recompute_share / 3  # forward = 1/3 of a layer's training matmul FLOPs
    tokens_rank = s.global_batch_tokens / L.gpus  # each rank's share of the step's work
    f_width = cfg.moe.ffn_hidden * max(1, cfg.moe.n_shared_experts) if moe else cfg.ffn_hidden
    size_dense = 2 * s.tokens_mb * d * f_width / L.tp / 1e9
    eff_dense = efficiency(c, size_dense)
    # fp8 applies to the decoder's linears; the attention kernel and the output head stay bf16.
    t_linear = f_dense * recompute / (peak_mm * efficiency(c, size_dense, blockwise))
    t_dense = tokens_rank * (t_linear + (f_attn * recompute + 6.0 * n_head) / (peak * eff_dense))
    t_exp = 0.0
    if moe:
        rows = s.tokens_mb * cfg.moe.top_k * s.ep / cfg.moe.n_routed_experts
        size_exp = 2 * rows * d * cfg.moe.ffn_hidden / 1e9
        t_exp = tokens_rank * 6.0 * n_routed * recompute / (peak_mm * efficiency(c, size_exp, blockwise))
    return t_dense, t_exp, peak


def _memory_seconds(s: _Shape, compile: bool) -> tuple[float, float]:
    """(memory-bound operators, optimizer step) of one rank."""
    cfg, L, c = s.cfg, s.L, s.c
    passes = c.elementwise_passes_compiled if compile else c.elementwise_passes
    loss_passes = passes if c.loss_passes is None else c.loss_passes
    recompute_elem = 4 / 3 if L.activation_checkpointing == "full" else 1.0
    saved = passes * sum(_per_layer_saved(cfg, i, L.tp, s.act_b) for i in range(s.layers)) * recompute_elem / L.pp
    # The loss: (tokens, vocab) logits, their fp32 softmax and its gradient, on the last stage (spread over pp here).
    saved += loss_passes * (8 if c.fp32 else s.act_b + 8) * cfg.vocab_size / L.tp * (1 + cfg.mtp.depth) / L.pp
    t_elem = saved * s.global_batch_tokens / (L.dp * L.sp) / (c.memory_bandwidth_gbps * 1e9 * s.share)
    shard = s.dense_params + s.expert_params
    if L.zero_stage >= 1:
        shard = s.dense_params / s.dp_group + s.expert_params / s.edp
    if L.offload_optimizer:
        t_opt = shard * ADAM_BYTES_PER_PARAM / (c.host_memory_bandwidth_gbps * 1e9 * s.share)
        t_opt += shard * (s.grad_b + s.act_b) / (c.offload_gbps * 1e9)  # gradients down, updated weights up
    else:
        t_opt = shard * ADAM_BYTES_PER_PARAM / (c.memory_bandwidth_gbps * 1e9 * s.share)
    return t_elem, t_opt


def _data_parallel_seconds(s: _Shape, compute: float, comm_overlap: float) -> tuple[float, float]:
    """(all data-parallel communication, the part of it and of the per-step collectives that is exposed)."""
    L, c = s.L, s.c
    # Tensor- and sequence-parallel ranks are consecutive; data-parallel ranks are tp x sp apart, or consecutive
    # within a pipeline stage (rank = stage x dp + dp_rank); expert groups are consecutive.
    g_dp = Group(s.dp_group, 1) if L.pp > 1 or L.sp > 1 else Group(L.dp, L.tp)
    g_edp = Group(s.edp, s.ep)
    dense_bytes, exp_bytes = s.dense_params * s.grad_b, s.expert_params * s.grad_b
    hidden = exposed = 0.0  # hidden: what overlaps backward
    if L.zero_stage == 0:
        hidden = all_reduce(c, g_dp, dense_bytes) + all_reduce(c, g_edp, exp_bytes)
    elif L.zero_stage in (1, 2):
        reductions = s.micro_batches if L.zero_stage == 2 else 1
        hidden = reductions * (reduce_scatter(c, g_dp, dense_bytes) + reduce_scatter(c, g_edp, exp_bytes))
        exposed = all_gather(c, g_dp, s.dense_params * s.act_b) + all_gather(c, g_edp, s.expert_params * s.act_b)
    else:  # DeepSpeed gathers each module's parameters on its own (forward, and again in backward)
        n = max(1, s.counts.get("tensors", 1) // (L.tp * L.pp))
        per_mb = 2 * all_gather(c, g_dp, s.dense_params * s.act_b, n) + reduce_scatter(c, g_dp, dense_bytes)
        per_mb += 2 * all_gather(c, g_edp, s.expert_params * s.act_b) + reduce_scatter(c, g_edp, exp_bytes)
        hidden = s.micro_batches * per_mb
    exposed += max(hidden * (1 - comm_overlap), hidden - (2 / 3) * compute)
    # Small collectives of every step over all ranks: the heartbeat barrier, the gradient norm, the logged loss.
    exposed += all_reduce(c, Group(L.gpus, 1), 8.0, count=3)
    return hidden, exposed


def _model_parallel_seconds(s: _Shape, tp_overlap: float, ep_overlap: float) -> dict[str, float]:
    """Per micro-batch tensor, sequence, expert and pipeline collectives (none overlapped in this trainer)."""
    cfg, L, c, m = s.cfg, s.L, s.c, s.micro_batches
    act = s.tokens_mb * cfg.d_model * s.act_b
    out = {"tensor_parallel": 0.0, "sequence_parallel": 0.0, "expert_parallel": 0.0, "pipeline_p2p": 0.0}
    if L.tp > 1:
        per_layer = 2 * s.forward_replays + 2
        one = all_reduce(c, Group(L.tp, 1), act)
        out["tensor_parallel"] = m * (s.layers / L.pp * per_layer + 3) * one * (1 - tp_overlap)
    if L.sp > 1:
        if cfg.attention == "mla":
            widths = cfg.n_heads * (2 * (cfg.qk_nope_head_dim + cfg.qk_rope_head_dim) + 2 * cfg.v_head_dim)
        else:
            widths = 2 * cfg.n_heads * cfg.head_dim + 2 * cfg.n_kv_heads * cfg.head_dim
        per_layer = (s.forward_replays + 1) * all_to_all(c, Group(L.sp, 1), s.tokens_mb * widths * s.act_b)
        out["sequence_parallel"] = m * s.layers / L.pp * per_layer
    if s.ep > 1:
        g = Group(s.ep, 1)
        moe_layers = sum(1 for i in range(s.layers) if cfg.is_moe_layer(i)) / L.pp
        dispatch = all_to_all(c, g, s.tokens_mb * cfg.moe.top_k * cfg.d_model * s.act_b)
        split_sizes = all_to_all(c, g, 8 * s.ep)  # the counts exchanged before each dispatch (a host sync)
        per_layer = (s.forward_replays + 1) * (2 * dispatch + split_sizes)
        out["expert_parallel"] = m * moe_layers * per_layer * (1 - ep_overlap)
    if L.pp > 1:
        inter = L.dp * L.pp > c.gpus_per_node  # some stage boundary crosses nodes
        out["pipeline_p2p"] = m * 2 * p2p(c, inter, act)
    return out


def step_time(
    cfg: ModelConfig,
    counts: dict,
    layout: Layout,
    cluster: ClusterConfig,
    seq_len: int,
    global_batch_tokens: int,
    *,
    compile: bool = False,
    fp8: bool = False,
    fp8_recipe: str = "tensorwise",
    comm_overlap: float = 0.0,
    ep_overlap: float = 0.0,
    tp_overlap: float = 0.0,
    recompute_share: float | None = None,
    comm_sm_share: float = 0.0,
    slowdown: float = 1.0,
) -> dict:
    """Predicted seconds per optimizer step of `layout` (see the module docstring), with its parts."""
    s = _Shape(cfg, counts, layout, cluster, seq_len, global_batch_tokens)
    pp, m = layout.pp, s.micro_batches
    t_dense, t_exp, peak = _matmul_seconds(s, fp8, fp8_recipe, recompute_share, comm_sm_share)
    t_elem, t_opt = _memory_seconds(s, compile)
    # Fixed costs (Python, dispatch, clipping, logging) per step and per micro-step, or per pipeline schedule slot.
    overhead = (cluster.step_overhead_s + (m + pp - 1) * cluster.micro_step_overhead_s) / s.share
    compute = t_dense + t_exp + t_elem + t_opt + overhead
    dp_comm, exposed = _data_parallel_seconds(s, compute, comm_overlap)
    model_parallel = _model_parallel_seconds(s, tp_overlap, ep_overlap)
    comm = exposed + sum(model_parallel.values())
    bubble = 0.0
    if pp > 1:  # a stage's per-micro-batch work, (pp - 1) more times
        per_mb = (t_dense + t_exp + t_elem + sum(model_parallel.values())) / m
        # On CPU ranks that outnumber the cores, a rank idle in the bubble gives its share of a core to the others.
        bubble = (pp - 1) * per_mb * s.share
    k = slowdown  # a CPU shared with other work: everything runs on this process's share of the cores
    parts = {
        "matmul_dense": t_dense,
        "matmul_experts": t_exp,
        "elementwise": t_elem,
        "optimizer": t_opt,
        "overhead": overhead,
        "data_parallel": dp_comm,
        "data_parallel_exposed": exposed,
        **model_parallel,
    }
    return {
        "step_time_s": (compute + comm + bubble) * k,
        "compute_s": compute * k,
        "comm_s": comm * k,
        "bubble_s": bubble * k,
        "parts_s": {name: t * k for name, t in parts.items()},
        "micro_batches": m,
        "peak_flops_per_gpu": peak,
    }
