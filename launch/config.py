"""Root schema of the launch entry point (`python -m launch.plan`) and the cluster description it reads
(`configs/cluster/*.yaml`), registered by `register_configs`."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from hydra.core.config_store import ConfigStore
from omegaconf import OmegaConf

from model.config import ExecutionConfig
from train.config import DeepSpeedConfig, ModelNode, ParallelConfig

CLUSTERS = Path(__file__).resolve().parent.parent / "configs" / "cluster"


@dataclass
class ClusterConfig:
    """One node type and its network (`configs/cluster/NAME.yaml`, or any file given as `gpu=PATH.yaml`).

    Bandwidths are what collectives achieve per GPU (NCCL bus bandwidth), not link datasheet figures."""

    name: str = "?"
    gpus_per_node: int = 8
    peak_tflops_bf16: float = 989.0
    """Dense bf16 tensor-core peak per GPU (TFLOP/s); MFU is quoted against it."""
    peak_tflops_fp8: float | None = None
    """Dense fp8 peak per GPU (TFLOP/s); null = no fp8 tensor cores (`execution.fp8` runs at the bf16 peak)."""
    sustained_peak: float = 1.0
    """Share of the datasheet peak the device sustains under dense matmuls (a power limit below the TDP lowers the
    clocks). Step times use peak x this; MFU stays quoted against the datasheet peak, as frameworks report it."""
    memory_gb: float = 80.0
    memory_bandwidth_gbps: float = 3350.0
    """Device memory bandwidth (GB/s): memory-bound elementwise work and the optimizer step."""
    intra_node_gbps: float = 360.0
    """Collective bus bandwidth per GPU inside a node (GB/s; NVLink)."""
    inter_node_gbps: float = 45.0
    """Collective bus bandwidth per GPU across nodes (GB/s; one 400 Gb/s InfiniBand NIC per GPU = 50 GB/s)."""
    intra_node_latency_us: float = 10.0
    inter_node_latency_us: float = 20.0
    """Per-step latency of one collective hop (microseconds)."""
    offload_gbps: float = 25.0
    """Host-device bandwidth per GPU (GB/s; PCIe) for ZeRO offload."""
    host_memory_bandwidth_gbps: float = 100.0
    """Host memory bandwidth per GPU (GB/s) for the offloaded optimizer step."""
    shared_compute: bool = False
    """True on CPU: `peak_tflops_bf16` is one core's (one thread's) rate, and the ranks of the node share its
    `cores` (a rank trains with one thread: `train.threads_per_rank=1`)."""
    cores: int = 1
    """Cores per node when shared_compute (each rank gets peak x min(1, cores / ranks on the node))."""
    load_average: float | None = None
    """shared_compute: the machine's 1-minute load average while it was calibrated. A plan with `load_average=L`
    scales the step time by L / this (on a CPU shared with other work each process gets cores / load of it)."""
    fp32: bool = False
    """True on CPU: training runs in fp32 (4 B activations and gradients) and memory is process RSS."""
    efficiency: list[list[float]] = field(
        default_factory=lambda: [[1.0, 0.2], [16.0, 0.5], [128.0, 0.7], [1024.0, 0.78]]
    )
    """Matmul efficiency curve: [GEMM GFLOP, fraction of the peak] points, log-interpolated, flat beyond the ends.
    A GEMM's size is 2 x rows x inner x columns. Fit with `python -m launch.fit_efficiency`."""
    efficiency_fp8_blockwise: list[list[float]] | None = None
    """The same for block-scaled fp8 GEMMs (`fp8_recipe=blockwise`, DeepSeek-V3's recipe), as a fraction of
    `peak_tflops_fp8`. Tensorwise-scaled fp8 GEMMs (this trainer's torchao float8) use the bf16 curve: they reach the
    share of the fp8 peak that bf16 GEMMs of the same size reach of theirs. null = the bf16 curve for both."""
    elementwise_passes: float = 4.0
    """Bytes that memory-bound operators (norms, activations, RoPE, residuals, casts, softmax of the loss) move per
    byte of the activations a layer saves for backward, forward + backward, without `execution.compile`."""
    elementwise_passes_compiled: float = 1.5
    """The same with `execution.compile=true` (fused elementwise kernels)."""
    loss_passes: float | None = None
    """The same for the loss's (tokens, vocab) logits, softmax and gradient; null = as the layers'."""
    step_overhead_s: float = 0.0
    """Fixed cost per optimizer step (launch overheads, Python, gradient clipping, logging)."""
    micro_step_overhead_s: float = 0.0
    """Fixed cost per micro-step (forward and backward dispatch), or per slot of a pipeline schedule (micro-batches
    + pp - 1)."""
    source: str = ""
    """Where the figures come from."""

    def __post_init__(self) -> None:
        if self.gpus_per_node <= 0 or self.peak_tflops_bf16 <= 0 or self.memory_gb <= 0:
            raise ValueError(f"cluster {self.name}: gpus_per_node, peak_tflops_bf16 and memory_gb must be positive")
        self.efficiency = self._curve("efficiency", self.efficiency)
        if self.efficiency_fp8_blockwise is not None:
            self.efficiency_fp8_blockwise = self._curve("efficiency_fp8_blockwise", self.efficiency_fp8_blockwise)
        if not 0 < self.sustained_peak <= 1:
            raise ValueError(f"cluster {self.name}: sustained_peak={self.sustained_peak} must be in (0, 1]")

    def _curve(self, key: str, points: list[list[float]]) -> list[list[float]]:
        """`points` checked as [[gflop > 0, fraction in (0, 1]], ...] and sorted by size."""
        if not points or any(len(p) != 2 or p[0] <= 0 or not 0 < p[1] <= 1 for p in points):
            raise ValueError(f"cluster {self.name}: {key} must be [[gflop > 0, fraction in (0, 1]], ...]")
        return sorted([float(a), float(b)] for a, b in points)


def cluster_names() -> list[str]:
    return sorted(p.stem for p in CLUSTERS.glob("*.yaml"))


def load_cluster(gpu: str) -> ClusterConfig:
    """The preset `configs/cluster/GPU.yaml`, or the cluster file at path `gpu` (validated against ClusterConfig)."""
    path = Path(gpu) if gpu.endswith((".yaml", ".yml")) else CLUSTERS / f"{gpu}.yaml"
    if not path.is_file():
        raise ValueError(
            f"gpu={gpu}: no cluster preset of that name; choose one of {cluster_names()} or give a cluster file "
            "gpu=PATH.yaml (fields: launch/config.py ClusterConfig)"
        )
    raw = OmegaConf.merge(OmegaConf.structured(ClusterConfig), OmegaConf.load(path))
    return OmegaConf.to_object(raw)


@dataclass
class PlanConfig:
    """Root of `configs/plan.yaml`."""

    model: ModelNode = field(default_factory=ModelNode)
    execution: ExecutionConfig = field(default_factory=ExecutionConfig)
    """Read: loss_impl, loss_chunk_size, activation_checkpointing, compile, fp8 (the run's `execution.*`)."""
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    """Read: tp_size, sp_size, pp_size, ep_size (also spelled model.moe.ep_size)."""
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    gpus: int = 8
    gpu: str = "h100"
    """A cluster preset of configs/cluster/ (h100 | h200 | h800 | a100 | a100-40g | b200 | cpu) or a cluster file."""
    tokens: str = "1e12"
    """Training tokens: a number, or with a suffix K, M, B, T (e.g. 300B)."""
    seq_len: int = 4096
    micro_batch_size: int | None = None
    """Sequences per GPU per micro-step; null = the largest that fits (with activation checkpointing if needed)."""
    global_batch_tokens: int = 4_194_304
    """Tokens per optimizer step (sets the gradient-accumulation steps and the pipeline's micro-batches)."""
    vocab_size: int = 128000
    """Used when model.vocab_size is 0 (taken from a tokenizer at train time)."""
    mfu: float | None = None
    """Given: time = FLOPs / (peak x mfu), as before issue 15. null = predicted by the cluster's performance model."""
    run_dir: str | None = None
    """A finished run: its mean measured MFU replaces the prediction."""
    price_per_gpu_hour: float = 2.5
    """USD."""
    gpu_memory_gb: float | None = None
    """Override the memory per GPU (GB)."""
    comm_overlap: float | None = None
    """Share of the data-parallel gradient reduction and ZeRO-3 gathers hidden under backward compute; null = 0.8
    with deepspeed.overlap_comm=true, else 0 (DeepSpeed then reduces each bucket synchronously)."""
    ep_overlap: float = 0.0
    """Share of the expert-parallel all-to-alls hidden under compute (0 in this trainer; ~1 with DualPipe)."""
    tp_overlap: float = 0.0
    """Share of the tensor-parallel collectives hidden under compute (0 in this trainer: AutoTP's all-reduces are
    synchronous; ~1 with Megatron-Core's --tp-comm-overlap)."""
    fp8_recipe: str = "tensorwise"
    """With execution.fp8: how the fp8 GEMMs are scaled. tensorwise = this trainer's (torchao float8); blockwise =
    DeepSeek-V3's 1x128 / 128x128 block scaling (the cluster's `efficiency_fp8_blockwise` curve)."""
    comm_sm_share: float = 0.0
    """Share of each GPU's compute units given to communication kernels that overlap compute (0 here; DeepSeek-V3's
    DualPipe all-to-all kernels use 20 of an H800's 132 SMs: 0.15)."""
    recompute_share: float | None = None
    """Share of the decoder's forward matmuls recomputed in backward; null = from execution.activation_checkpointing
    (none and this trainer's selective policy 0, full 1). Other frameworks' policies: torchtitan's selective op
    policy recomputes every other matmul (0.5)."""
    load_average: float | None = None
    """CPU clusters shared with other work: the 1-minute load average the run will see (null = the calibration's)."""
    search: bool = False
    """Search the layouts (ZeRO stage, tp, sp, pp, ep, micro-batch, checkpointing, offload) that fit; cheapest first."""
    search_top: int = 10
    """Layouts printed by the search."""
    out: str | None = None
    """Write the chosen layout as an experiment config (e.g. configs/experiment/NAME.yaml) for train.pretrain."""

    def __post_init__(self) -> None:
        if self.gpus <= 0 or (self.mfu is not None and not 0 < self.mfu <= 1):
            raise ValueError("gpus must be positive and mfu in (0, 1] (or null: predicted)")
        if self.comm_overlap is not None and not 0 <= self.comm_overlap <= 1:
            raise ValueError(f"comm_overlap={self.comm_overlap}: a share in [0, 1]")
        if self.fp8_recipe not in ("tensorwise", "blockwise"):
            raise ValueError(f"fp8_recipe={self.fp8_recipe}: choose tensorwise (this trainer's) or blockwise")
        for key in ("ep_overlap", "tp_overlap"):
            if not 0 <= getattr(self, key) <= 1:
                raise ValueError(f"{key}={getattr(self, key)}: a share in [0, 1]")
        if self.global_batch_tokens % self.seq_len:
            raise ValueError(
                f"global_batch_tokens={self.global_batch_tokens} is not a multiple of seq_len={self.seq_len}"
            )
        if self.out is not None and not self.out.endswith(".yaml"):
            raise ValueError(f"out={self.out}: write the experiment config as configs/experiment/NAME.yaml")
        if isinstance(self.model, ModelNode):  # moved keys were taken out by move_deprecated_keys
            self.model = self.model.model_config()
        if self.model.moe.enabled and self.model.moe.n_routed_experts % self.parallel.ep_size:
            raise ValueError(f"parallel.ep_size={self.parallel.ep_size} must divide model.moe.n_routed_experts")


def register_configs() -> None:
    """Register the launch entry points' root schemas so Hydra validates their configs against them."""
    ConfigStore.instance().store(name="plan_schema", node=PlanConfig)


register_configs()
