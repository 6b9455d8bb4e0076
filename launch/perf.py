"""Step time of one parallel layout on a cluster: compute, exposed communication and the pipeline bubble.

    step = compute + exposed communication + bubble

Compute per rank (its 1 / world of the step's FLOPs, tensor, sequence and pipeline parallelism splitting the work):
- matmuls: FLOPs / (peak x efficiency(GEMM size)), with the cluster's measured efficiency curve; the dense part
  (projections, dense MLP, shared experts, output head, attention scores) at the size of the MLP's up-projection
  on this rank (2 x tokens per micro-batch / sp x d_model x ffn / tp), routed experts at the size of one local
  expert's GEMM (tokens x top_k x ep / n_routed_experts rows); with execution.fp8 the decoder's linears at the fp8
  peak (attention scores and the output head stay bf16);
  full activation checkpointing recomputes the decoder's forward (+1/3 of its matmul FLOPs; `recompute_share` of
  the forward's matmuls in general: 0 for this trainer's selective policy, 0.5 for torchtitan's, which recomputes
  every other matmul);
- memory-bound operators: `elementwise_passes` x the bytes a layer saves for backward (MoE layers: plus the
  top_k token copies routed to and from the experts; the loss: logits, fp32 softmax and gradient), over memory
  bandwidth (fitted per cluster, without and with `execution.compile`);
- the optimizer step: 16 B per local parameter read and written (fp32 master, Adam m, v, gradient) over memory
  bandwidth, or over host memory bandwidth and the host link with ZeRO-Offload.

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
  layer in forward and 2 in backward, plus the vocabulary-parallel embedding and loss;
- Ulysses: 4 all-to-alls (q, k, v, attention output) per layer in forward and 4 in backward;
- expert parallelism: dispatch and combine all-to-alls of tokens x top_k x d_model per MoE layer, forward and
  backward (`ep_overlap` hidden); full checkpointing replays the forward's TP, Ulysses and EP collectives;
- pipeline: one (tokens, d_model) send per micro-batch forward and one backward at each stage boundary.

Pipeline bubble (1F1B): idle share (pp - 1) / (m + pp - 1) of the step with m micro-batches per step, i.e. the
bubble adds (pp - 1) / m x the per-micro-batch work of a stage.
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


def rank_peak_flops(c: ClusterConfig, gpus: int) -> float:
    """One rank's bf16 peak FLOP/s: the device's, or on CPU its share of the node's cores."""
    if c.shared_compute:
        return c.peak_tflops_bf16 * 1e12 * min(1.0, c.cores / min(gpus, c.gpus_per_node))
    return c.peak_tflops_bf16 * 1e12


def efficiency(cluster: ClusterConfig, gflop: float) -> float:
    """The cluster's matmul efficiency at a GEMM of `gflop` GFLOP (log-linear between points, flat outside)."""
    pts = cluster.efficiency
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
    comm_overlap: float = 0.0,
    ep_overlap: float = 0.0,
    recompute_share: float | None = None,
    comm_sm_share: float = 0.0,
    slowdown: float = 1.0,
) -> dict:
    """Predicted seconds per optimizer step of `layout` (see the module docstring), with its parts."""
    L, c = layout, cluster
    W, tp, sp, pp, dp = L.gpus, L.tp, L.sp, L.pp, L.dp
    moe = cfg.moe.enabled
    ep = L.ep if moe else 1
    act_b = 4 if c.fp32 else 2  # activations and communicated tensors
    grad_b = 4 if c.fp32 else 2  # DeepSpeed reduces gradients in the training dtype
    seqs = global_batch_tokens // seq_len
    micro_batches = max(1, seqs // (L.micro_batch_size * dp))  # per pipeline (= gradient accumulation steps)
    tokens_mb = L.micro_batch_size * seq_len / sp  # tokens a rank's layers see per micro-batch
    peak = rank_peak_flops(c, W) * (1 - comm_sm_share)  # compute units left to compute while comm kernels run
    peak_mm = peak * c.peak_tflops_fp8 / c.peak_tflops_bf16 if fp8 and c.peak_tflops_fp8 else peak
    layers = cfg.n_layers + cfg.mtp.depth
    d = cfg.d_model

    # FLOPs per token, split into the dense matmuls, the routed experts, the attention scores and the head.
    n_act = activated_params(cfg)
    n_head = d * cfg.vocab_size * (1 + cfg.mtp.depth)
    n_routed = 0
    if moe:
        n_routed = sum(3 * d * cfg.moe.ffn_hidden * cfg.moe.top_k for i in range(layers) if cfg.is_moe_layer(i))
    per_head = (
        cfg.qk_nope_head_dim + cfg.qk_rope_head_dim + cfg.v_head_dim if cfg.attention == "mla" else 2 * cfg.head_dim
    )
    f_attn = 6.0 * layers * cfg.n_heads * per_head * seq_len
    f_dense = 6.0 * (n_act - n_routed - n_head)
    f_head = 6.0 * n_head
    f_exp = 6.0 * n_routed
    if recompute_share is None:
        recompute_share = 1.0 if L.activation_checkpointing == "full" else 0.0
    recompute = 1 + recompute_share / 3  # forward = 1/3 of a layer's training matmul FLOPs
    recompute_elem = 4 / 3 if L.activation_checkpointing == "full" else 1.0
    tokens_rank = global_batch_tokens / W  # each rank's share of the step's work
    f_width = cfg.moe.ffn_hidden * max(1, cfg.moe.n_shared_experts) if moe else cfg.ffn_hidden
    size_dense = 2 * tokens_mb * d * f_width / tp / 1e9
    eff_dense = efficiency(c, size_dense)
    # fp8 applies to the decoder's linears; the attention kernel and the output head stay bf16.
    t_dense = tokens_rank * (f_dense * recompute / peak_mm + (f_attn * recompute + f_head) / peak) / eff_dense
    t_exp = 0.0
    if moe:
        rows = tokens_mb * cfg.moe.top_k * ep / cfg.moe.n_routed_experts
        size_exp = 2 * rows * d * cfg.moe.ffn_hidden / 1e9
        t_exp = tokens_rank * f_exp * recompute / (peak_mm * efficiency(c, size_exp))
    passes = c.elementwise_passes_compiled if compile else c.elementwise_passes
    loss_passes = passes if c.loss_passes is None else c.loss_passes
    saved = passes * sum(_per_layer_saved(cfg, i, tp, act_b) for i in range(layers)) * recompute_elem / pp
    # The loss: (tokens, vocab) logits, their fp32 softmax and its gradient, on the last stage (spread over pp here).
    saved += loss_passes * (8 if c.fp32 else act_b + 8) * cfg.vocab_size / tp * (1 + cfg.mtp.depth) / pp
    t_elem = saved * global_batch_tokens / (dp * sp) / (c.memory_bandwidth_gbps * 1e9)

    # Parameters this rank holds (before ZeRO sharding): layers split by pp, widths by tp, experts by ep.
    dense_params = (counts["total"] - counts["routed_experts"]) / (tp * pp)
    expert_params = counts["routed_experts"] / (ep * pp)
    dp_group = dp * sp  # ZeRO and the gradient reduction span the data- and sequence-parallel ranks
    edp = max(1, dp_group // ep)
    shard = (dense_params / dp_group + expert_params / edp) if L.zero_stage >= 1 else dense_params + expert_params
    if L.offload_optimizer:
        t_opt = shard * ADAM_BYTES_PER_PARAM / (c.host_memory_bandwidth_gbps * 1e9)
        t_opt += shard * (grad_b + act_b) / (c.offload_gbps * 1e9)  # gradients down, updated weights up
    else:
        t_opt = shard * ADAM_BYTES_PER_PARAM / (c.memory_bandwidth_gbps * 1e9)
    compute = t_dense + t_exp + t_elem + t_opt + c.step_overhead_s

    # Groups. Tensor- and sequence-parallel ranks are consecutive; data-parallel ranks are tp x sp apart, or
    # consecutive within a pipeline stage (rank = stage x dp + dp_rank); expert groups are consecutive.
    inner = tp * sp
    g_dp = Group(dp_group, 1) if pp > 1 else Group(dp, inner) if sp == 1 else Group(dp_group, 1)
    g_edp = Group(edp, ep)
    forward_replays = 2 if L.activation_checkpointing == "full" else 1  # recompute replays forward collectives

    # Data parallel.
    dense_bytes = dense_params * grad_b
    exp_bytes = expert_params * grad_b
    hidden = 0.0  # communication that overlaps backward
    exposed = 0.0
    if L.zero_stage == 0:
        hidden += all_reduce(c, g_dp, dense_bytes) + all_reduce(c, g_edp, exp_bytes)
    elif L.zero_stage in (1, 2):
        reductions = micro_batches if L.zero_stage == 2 else 1
        hidden += reductions * (reduce_scatter(c, g_dp, dense_bytes) + reduce_scatter(c, g_edp, exp_bytes))
        exposed += all_gather(c, g_dp, dense_params * act_b) + all_gather(c, g_edp, expert_params * act_b)
    else:  # DeepSpeed gathers each module's parameters on its own (forward, and again in backward)
        n = max(1, counts.get("tensors", 1) // (tp * pp))
        per_mb = 2 * all_gather(c, g_dp, dense_params * act_b, n) + reduce_scatter(c, g_dp, dense_bytes)
        per_mb += 2 * all_gather(c, g_edp, expert_params * act_b) + reduce_scatter(c, g_edp, exp_bytes)
        hidden += micro_batches * per_mb
    dp_comm = hidden
    exposed += max(hidden * (1 - comm_overlap), hidden - (2 / 3) * compute)
    # Small collectives of every step over all ranks: the heartbeat barrier, the gradient norm, the logged loss.
    exposed += all_reduce(c, Group(W, 1), 8.0, count=3)

    # Per micro-batch model-parallel collectives (never overlapped in this trainer).
    act = tokens_mb * d * act_b
    t_tp = t_sp = t_ep = t_pp = 0.0
    if tp > 1:
        g = Group(tp, 1)
        per_layer = 2 * forward_replays + 2
        t_tp = micro_batches * (layers / pp * per_layer + 3) * all_reduce(c, g, act)
    if sp > 1:
        g = Group(sp, 1)
        if cfg.attention == "mla":
            widths = cfg.n_heads * (2 * (cfg.qk_nope_head_dim + cfg.qk_rope_head_dim) + 2 * cfg.v_head_dim)
        else:
            widths = 2 * cfg.n_heads * cfg.head_dim + 2 * cfg.n_kv_heads * cfg.head_dim
        per_layer = (forward_replays + 1) * all_to_all(c, g, tokens_mb * widths * act_b)
        t_sp = micro_batches * layers / pp * per_layer
    if moe and ep > 1:
        g = Group(ep, 1)
        moe_layers = sum(1 for i in range(layers) if cfg.is_moe_layer(i)) / pp
        dispatch = all_to_all(c, g, tokens_mb * cfg.moe.top_k * d * act_b)
        split_sizes = all_to_all(c, g, 8 * ep)  # the counts exchanged before each dispatch (a host sync)
        per_layer = (forward_replays + 1) * (2 * dispatch + split_sizes)
        t_ep = micro_batches * moe_layers * per_layer * (1 - ep_overlap)
    if pp > 1:
        inter = dp * pp > c.gpus_per_node  # some stage boundary crosses nodes
        t_pp = micro_batches * 2 * p2p(c, inter, act)
    comm = exposed + t_tp + t_sp + t_ep + t_pp

    bubble = 0.0
    if pp > 1:  # a stage's per-micro-batch work, (pp - 1) more times
        per_mb = (t_dense + t_exp + t_elem + t_tp + t_sp + t_ep + t_pp) / micro_batches
        bubble = (pp - 1) * per_mb
    k = slowdown  # a CPU shared with other work: everything runs on this process's share of the cores
    step = compute + comm + bubble
    return {
        "step_time_s": step * k,
        "compute_s": compute * k,
        "comm_s": comm * k,
        "bubble_s": bubble * k,
        "parts_s": {
            "matmul_dense": t_dense * k,
            "matmul_experts": t_exp * k,
            "elementwise": t_elem * k,
            "optimizer": t_opt * k,
            "data_parallel": dp_comm * k,
            "data_parallel_exposed": exposed * k,
            "tensor_parallel": t_tp * k,
            "sequence_parallel": t_sp * k,
            "expert_parallel": t_ep * k,
            "pipeline_p2p": t_pp * k,
        },
        "micro_batches": micro_batches,
        "peak_flops_per_gpu": peak,
    }
