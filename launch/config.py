"""Root schema of the launch entry point (`python -m launch.plan`), registered by `register_configs`."""

from __future__ import annotations

from dataclasses import dataclass, field

from hydra.core.config_store import ConfigStore

from model.config import ExecutionConfig
from train.config import DeepSpeedConfig, ModelNode, ParallelConfig

# bf16 dense peak FLOP/s and memory per GPU.
GPUS = {
    "h100": (989e12, 80e9),
    "h200": (989e12, 141e9),
    "h800": (989e12, 80e9),
    "a100": (312e12, 80e9),
    "a100-40g": (312e12, 40e9),
}


@dataclass
class PlanConfig:
    """Root of `configs/plan.yaml`."""

    model: ModelNode = field(default_factory=ModelNode)
    execution: ExecutionConfig = field(default_factory=ExecutionConfig)
    """Read: loss_impl, loss_chunk_size, activation_checkpointing (the run's `execution.*`)."""
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    """Read: ep_size (MoE models: routed experts split over this many ranks)."""
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    gpus: int = 8
    gpu: str = "h100"
    """h100 | h200 | h800 | a100 | a100-40g | cpu."""
    tokens: str = "1e12"
    """Training tokens: a number, or with a suffix K, M, B, T (e.g. 300B)."""
    seq_len: int = 4096
    micro_batch_size: int | None = None
    """Sequences per GPU per step; null = the largest that fits (with activation checkpointing if needed)."""
    vocab_size: int = 128000
    """Used when model.vocab_size is 0 (taken from a tokenizer at train time)."""
    mfu: float = 0.40
    run_dir: str | None = None
    """A finished run: its mean measured MFU replaces `mfu`."""
    price_per_gpu_hour: float = 2.5
    """USD."""
    gpu_memory_gb: float | None = None
    """Override the memory per GPU (GB)."""

    def __post_init__(self) -> None:
        if self.gpu not in GPUS and self.gpu != "cpu":
            raise ValueError(f"gpu={self.gpu!r}: choose one of {sorted(GPUS)} or cpu")
        if self.gpus <= 0 or not 0 < self.mfu <= 1:
            raise ValueError("gpus must be positive and mfu in (0, 1]")
        if isinstance(self.model, ModelNode):  # moved keys were taken out by move_deprecated_keys
            self.model = self.model.model_config()
        if self.model.moe.enabled and self.model.moe.n_routed_experts % self.parallel.ep_size:
            raise ValueError(f"parallel.ep_size={self.parallel.ep_size} must divide model.moe.n_routed_experts")


def register_configs() -> None:
    """Register the launch entry points' root schemas so Hydra validates their configs against them."""
    ConfigStore.instance().store(name="plan_schema", node=PlanConfig)


register_configs()
