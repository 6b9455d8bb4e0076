"""Typed configuration of a pretraining run, registered in Hydra's ConfigStore as the schema of `configs/train.yaml`.

An unknown key or a wrong type fails when Hydra composes the config; value checks run in `__post_init__` when the
entry point converts the composed config to these dataclasses (`OmegaConf.to_object`).
"""

from __future__ import annotations

import dataclasses
import os
import sys
from dataclasses import dataclass, field

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from data_pipeline.config import DataConfig
from model.config import MOVED_KEYS as MODEL_MOVED_KEYS
from model.config import ExecutionConfig, ModelConfig, MoEConfig, MTPConfig
from tokenizer.config import TokenizerConfig

SCHEDULES = ("cosine", "wsd", "constant")
DTYPES = ("auto", "fp32", "bf16")
WANDB_MODES = ("offline", "online", "disabled")


OPTIMIZERS = ("adamw", "muon")
NS_DTYPES = ("auto", "fp32", "bf16")


@dataclass
class MuonConfig:
    """Muon for the hidden 2-D weight matrices (`optim.muon`, used when optim.name=muon; the other parameters keep
    AdamW with `optim.*`). Update = NS(nesterov momentum) * rms_scale * sqrt(max(fan_out, fan_in)), Moonlight's
    scaling to AdamW's update RMS, so AdamW's lr and weight decay carry over."""

    lr: float | None = None
    """Muon's learning rate; null = optim.lr (the scaling makes AdamW's lr the right one). Same schedule."""
    weight_decay: float | None = None
    """Decoupled weight decay of the Muon matrices; null = optim.weight_decay."""
    momentum: float = 0.95
    nesterov: bool = True
    ns_steps: int = 5
    """Newton-Schulz iterations."""
    ns_coefficients: list[float] = field(default_factory=lambda: [3.4445, -4.7750, 2.0315])
    """Quintic Newton-Schulz coefficients (a, b, c) (Keller Jordan's, as torch.optim.Muon)."""
    eps: float = 1e-7
    """Added to the Frobenius norm that scales a matrix into Newton-Schulz's range."""
    rms_scale: float = 0.2
    """Moonlight's 0.2: the orthogonalized update times rms_scale * sqrt(max(fan_out, fan_in)) has AdamW's RMS."""
    ns_dtype: str = "auto"
    """Dtype of the Newton-Schulz iteration: auto (bf16 on accelerators, fp32 on CPU) | fp32 | bf16."""

    def __post_init__(self) -> None:
        if self.lr is not None and self.lr <= 0:
            raise ValueError(f"optim.muon.lr={self.lr} must be > 0 (or null = optim.lr)")
        if not 0 <= self.momentum < 1:
            raise ValueError(f"optim.muon.momentum={self.momentum} must be in [0, 1)")
        if not 1 <= self.ns_steps < 100:
            raise ValueError(f"optim.muon.ns_steps={self.ns_steps} must be in [1, 99]")
        if len(self.ns_coefficients) != 3:
            raise ValueError(f"optim.muon.ns_coefficients={list(self.ns_coefficients)}: give three numbers a, b, c")
        if self.rms_scale <= 0 or self.eps <= 0:
            raise ValueError("optim.muon.rms_scale and optim.muon.eps must be > 0")
        if self.ns_dtype not in NS_DTYPES:
            raise ValueError(f"optim.muon.ns_dtype={self.ns_dtype!r}: choose one of {NS_DTYPES}")


@dataclass
class QKClipConfig:
    """QK-clip (Kimi K2's MuonClip) and the `max_attn_logit` metric (`optim.qk_clip`; works with AdamW too)."""

    enabled: bool = False
    """After each applied update, rescale the query/key weights of every head whose largest pre-softmax logit in
    the step exceeded `tau`, by tau / max (MLA: the head-specific parts only, never the shared rotary key)."""
    tau: float = 100.0
    """Logit threshold (Kimi K2: 100)."""
    log_max_logit: bool = False
    """Log `max_attn_logit` (and per layer) without clipping; always logged when `enabled`. Off: nothing is
    computed (the attention kernels run untouched)."""

    def __post_init__(self) -> None:
        if self.tau <= 0:
            raise ValueError(f"optim.qk_clip.tau={self.tau} must be > 0")


@dataclass
class OptimConfig:
    """The optimizer (AdamW, or Muon for hidden matrices + AdamW for the rest) and its learning-rate schedule."""

    name: str = "adamw"
    """adamw | muon (Muon for the 2-D hidden matrices, AdamW with the settings below for everything else)."""
    lr: float = 3e-4
    min_lr_ratio: float = 0.1
    """Final learning rate as a fraction of `lr` (cosine and WSD)."""
    weight_decay: float = 0.1
    """Applied to matrices only (not norms, biases)."""
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0
    """Max global gradient norm; 0 disables clipping."""
    schedule: str = "cosine"
    """cosine | wsd (warmup-stable-decay) | constant (after warmup)."""
    warmup_steps: int = 100
    decay_fraction: float = 0.2
    """WSD: share of `train.max_steps` spent decaying at the end."""
    muon: MuonConfig = field(default_factory=MuonConfig)
    qk_clip: QKClipConfig = field(default_factory=QKClipConfig)

    def __post_init__(self) -> None:
        if self.name not in OPTIMIZERS:
            raise ValueError(f"optim.name={self.name!r}: choose one of {OPTIMIZERS}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"optim.schedule={self.schedule!r}: choose one of {SCHEDULES}")
        if self.lr <= 0 or not 0 <= self.min_lr_ratio <= 1:
            raise ValueError("optim.lr must be > 0 and optim.min_lr_ratio in [0, 1]")
        if not 0 < self.decay_fraction <= 1:
            raise ValueError("optim.decay_fraction must be in (0, 1]")


@dataclass
class DeepSpeedConfig:
    """ZeRO stage, offload and communication settings passed to `deepspeed.initialize`."""

    zero_stage: int = 2
    """0 (plain data parallel), 1 (optimizer states), 2 (+ gradients), 3 (+ parameters) sharded across ranks."""
    offload_optimizer: bool = False
    """Keep optimizer states on CPU (ZeRO-Offload; stages 1-3)."""
    offload_param: bool = False
    """Keep parameters on CPU (ZeRO-Infinity; stage 3 only)."""
    overlap_comm: bool = False
    """Overlap gradient reduce-scatter / all-reduce with the backward pass (DeepSpeed's default for stages 1-2;
    costs extra buffers of about 4.5x reduce_bucket_size elements). Worth turning on with several GPUs."""
    contiguous_gradients: bool = True
    """Copy gradients into one contiguous buffer as they are produced (less fragmentation, larger collectives)."""
    reduce_bucket_size: int = 500_000_000
    """Elements per gradient reduce bucket (DeepSpeed's default): larger = fewer, bigger collectives, more memory."""
    allgather_bucket_size: int = 500_000_000
    """Elements per parameter all-gather bucket after the optimizer step (ZeRO 1-2; DeepSpeed's default)."""
    backend: str = "auto"
    """torch.distributed backend: auto = nccl on CUDA, gloo on CPU."""
    timeout_minutes: float = 30.0
    """Collective timeout (fractions allowed, e.g. 0.25 = 15 s): a stalled rank ends the job instead of hanging."""
    heartbeat: bool = True
    """Before each step, a gloo `monitored_barrier`: a rank that does not arrive within the timeout is named."""

    def __post_init__(self) -> None:
        if self.zero_stage not in (0, 1, 2, 3):
            raise ValueError(f"deepspeed.zero_stage={self.zero_stage}: choose 0, 1, 2 or 3")
        if self.offload_param and self.zero_stage != 3:
            raise ValueError("deepspeed.offload_param needs deepspeed.zero_stage=3")
        if self.offload_optimizer and self.zero_stage == 0:
            raise ValueError("deepspeed.offload_optimizer needs deepspeed.zero_stage >= 1")
        if self.backend not in ("auto", "gloo", "nccl"):
            raise ValueError(f"deepspeed.backend={self.backend!r}: choose auto, gloo or nccl")
        if self.timeout_minutes <= 0:
            raise ValueError(f"deepspeed.timeout_minutes={self.timeout_minutes} must be > 0")


@dataclass
class WandbConfig:
    """Weights & Biases run settings; offline runs land in RUN_DIR/wandb/."""

    mode: str = "offline"
    """offline (default) | online | disabled."""
    project: str = "hangang"
    entity: str | None = None
    group: str | None = None
    name: str | None = None
    tags: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.mode not in WANDB_MODES:
            raise ValueError(f"logging.wandb.mode={self.mode!r}: choose one of {WANDB_MODES}")


@dataclass
class LoggingConfig:
    """Where and how often metrics go."""

    log_every: int = 1
    """Optimizer steps between metrics.jsonl / W&B lines."""
    progress: bool = True
    """Progress bar on rank 0."""
    wandb: WandbConfig = field(default_factory=WandbConfig)


@dataclass
class SpikeConfig:
    """Loss-spike detector: a robust z-score of the step's loss against the median/MAD of recent accepted losses."""

    window: int = 100
    """Accepted losses the median and MAD are taken over; detection starts once it is full. 0 disables."""
    z_threshold: float = 6.0
    """A loss with (loss - median) / (1.4826 * MAD) above this is a spike: its update is skipped."""
    max_consecutive: int = 3
    """After this many spikes in a row, roll back to the latest checkpoint and skip the batches that spiked."""

    def __post_init__(self) -> None:
        if self.window < 0 or (self.window and self.window < 3):
            raise ValueError(f"train.spike.window={self.window}: use 0 (off) or at least 3 losses")
        if self.z_threshold <= 0 or self.max_consecutive < 1:
            raise ValueError("train.spike.z_threshold must be > 0 and train.spike.max_consecutive >= 1")


BALANCES = ("aux_free", "aux_loss")


@dataclass
class BalanceConfig:
    """MoE load balancing during training (`train.moe`): DeepSeek-V3's auxiliary-loss-free bias plus a small
    sequence-wise balance loss, or (aux_loss) the balance loss alone."""

    balance: str = "aux_free"
    """aux_free: per-expert selection bias moved by `gamma` after each step, plus a sequence-wise loss with
    `seq_aux_alpha` | aux_loss: no bias; sequence-wise balance loss with `aux_loss_alpha` (DeepSeek-V2 style)."""
    gamma: float = 1e-3
    """Bias update speed (DeepSeek-V3: 0.001)."""
    gamma_until: float = 1.0
    """gamma until this fraction of train.max_steps, then 0 (DeepSeek-V3 froze it for the last ~3% of tokens)."""
    seq_aux_alpha: float = 1e-4
    """Weight of the complementary sequence-wise balance loss in aux_free mode (DeepSeek-V3: 0.0001)."""
    aux_loss_alpha: float = 1e-2
    """Weight of the sequence-wise balance loss in aux_loss mode."""
    warn_violation: float = 1.0
    """Warn (rank 0, naming the layer) when a layer's violation (busiest expert's load / mean load - 1) stays above
    this for `warn_steps` steps in a row; once per such episode. 0 disables."""
    warn_steps: int = 20
    """Consecutive steps above `warn_violation` before the warning."""

    def __post_init__(self) -> None:
        if self.balance not in BALANCES:
            raise ValueError(f"train.moe.balance={self.balance!r}: choose one of {BALANCES}")
        if self.warn_violation < 0 or self.warn_steps < 1:
            raise ValueError("train.moe.warn_violation must be >= 0 (0 = off) and train.moe.warn_steps >= 1")

    def gamma_at(self, progress: float) -> float:
        """Bias update speed at `progress` = step / max_steps (0 in aux_loss mode)."""
        if self.balance != "aux_free":
            return 0.0
        return self.gamma if progress < self.gamma_until else 0.0

    @property
    def seq_alpha(self) -> float:
        return self.seq_aux_alpha if self.balance == "aux_free" else self.aux_loss_alpha


@dataclass
class MTPWeightConfig:
    """Weight lambda of the multi-token-prediction loss over training (`train.mtp`; DeepSeek-V3's schedule)."""

    loss_weight: float = 0.3
    """lambda until `weight_switch` of training (DeepSeek-V3: 0.3)."""
    loss_weight_final: float = 0.1
    """lambda after `weight_switch` (DeepSeek-V3: 0.1 for the last 4.8T of 14.8T tokens)."""
    weight_switch: float = 0.7
    """Fraction of train.max_steps at which lambda switches to `loss_weight_final`."""

    def weight_at(self, progress: float) -> float:
        return self.loss_weight if progress < self.weight_switch else self.loss_weight_final


@dataclass
class ParallelConfig:
    """Parallel degrees beyond ZeRO data parallelism (`parallel`)."""

    ep_size: int = 1
    """Expert-parallel degree: routed experts sharded over this many ranks (1 = every rank holds every expert).
    Also spelled `model.moe.ep_size`."""

    tp_size: int = 1
    """Tensor-parallel degree: attention heads, MLP hidden units and the vocabulary split over this many ranks
    (DeepSpeed AutoTP). Ranks of one tensor-parallel group are consecutive."""
    sp_size: int = 1
    """Sequence-parallel degree (DeepSpeed Ulysses): each sequence split into this many shards, attention heads
    exchanged by all-to-all around the attention kernel. Ranks of one group are consecutive."""
    pp_size: int = 1
    """Pipeline-parallel degree (DeepSpeed PipelineModule): the decoder split into this many stages."""

    def __post_init__(self) -> None:
        if self.ep_size <= 0:
            raise ValueError(f"model.moe.ep_size must be positive, got {self.ep_size}")
        for key in ("tp_size", "sp_size", "pp_size"):
            if getattr(self, key) <= 0:
                raise ValueError(f"parallel.{key} must be positive, got {getattr(self, key)}")


@dataclass
class TrainConfig:
    """The optimization run: length, batch layout, precision, evaluation."""

    max_steps: int = 1000
    seed: int = 0
    seq_len: int = 256
    global_batch_tokens: int = 8192
    """Tokens per optimizer step across all ranks = seq_len x micro_batch_size x grad_accum x world_size."""
    micro_batch_size: int = 8
    """Sequences per rank per forward pass."""
    dtype: str = "auto"
    """auto (bf16 on CUDA, fp32 on CPU) | fp32 | bf16."""
    eval_every: int = 100
    """Steps between validation runs (also at the start and the end); 0 disables validation."""
    eval_sequences: int = 64
    eval_per_source: bool = True
    """Also report `val_loss/SOURCE` for each source's held-out documents (eval_sequences / sources each)."""
    """Validation sequences per evaluation, spread evenly over the validation split (always the same ones)."""
    peak_tflops: float | None = None
    """Peak TFLOP/s per device for MFU; null = a known GPU's bf16 dense peak, or a measured CPU matmul rate."""
    threads_per_rank: int = 0
    """torch intra-op threads per rank on CPU; 0 = cores / local ranks."""
    exit_after_steps: int | None = None
    """Save a checkpoint and exit after this many steps of this launch (time-limited jobs; resume tests)."""
    spike: SpikeConfig = field(default_factory=SpikeConfig)
    moe: BalanceConfig = field(default_factory=lambda: BalanceConfig())
    mtp: MTPWeightConfig = field(default_factory=lambda: MTPWeightConfig())
    compile: bool | None = None
    """Deprecated spelling of `execution.compile`."""
    fp8: bool | None = None
    """Deprecated spelling of `execution.fp8`."""

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ValueError(f"train.dtype={self.dtype!r}: choose one of {DTYPES}")
        for key in ("max_steps", "seq_len", "global_batch_tokens", "micro_batch_size"):
            if getattr(self, key) <= 0:
                raise ValueError(f"train.{key} must be positive, got {getattr(self, key)}")


@dataclass
class CheckpointConfig:
    """DeepSpeed checkpoints under RUN_DIR/checkpoints/."""

    every_steps: int = 100
    """Steps between checkpoints (and one at the end); 0 = only at the end."""
    resume: str = "auto"
    """auto: resume from RUN_DIR/checkpoints/latest when present | never: refuse a run.dir that has checkpoints
    (a torchrun restart of the same job after a rank failure still resumes)."""
    keep_last: int = 3
    """Most recent checkpoints kept (older ones deleted after each save); 0 keeps all."""
    keep_every: int = 0
    """Also keep every checkpoint whose step is a multiple of this, whatever keep_last says; 0 = none."""
    verify_hashes: bool = True
    """On resume, check every file's sha256 against the checkpoint's manifest (else sizes only; huge checkpoints)."""
    preemption_signals: list[str] = field(default_factory=lambda: ["SIGTERM", "SIGUSR1", "SIGINT"])
    """Signals that make the run finish its step, save a checkpoint and exit 0 (SLURM: `--signal=B:USR1@180`;
    SIGINT = Ctrl-C). `python -m launch.run` forwards SIGINT, SIGTERM and SIGUSR1 to the workers."""
    preemption_grace_s: float = 120.0
    """Time a scheduler allows between the signal and the kill; a save that took longer is reported."""

    def __post_init__(self) -> None:
        if self.resume not in ("auto", "never"):
            raise ValueError(f"checkpoint.resume={self.resume!r}: choose auto or never")
        if self.keep_last < 0 or self.keep_every < 0:
            raise ValueError("checkpoint.keep_last and checkpoint.keep_every must be >= 0 (0 = keep all / none)")


@dataclass
class DebugConfig:
    """Fault injection for tests (the `debug` block); every default leaves training untouched."""

    step_sleep_s: float = 0.0
    """Sleep after every optimizer step, so a test can signal or kill a run mid-flight."""
    kill_during_save_at: int | None = None
    """SIGKILL the job (under torchrun: the agent and every local rank) just before rank 0's N-th file operation of
    this launch's checkpoint saves (counted over all of them, 1 = the first); crash tests walk N over a save."""
    kill_rank_at_step: list[int] = field(default_factory=list)
    """[rank, step]: that rank SIGKILLs itself after that step, on the first attempt only (TORCHELASTIC_RESTART_COUNT
    = 0), so `torchrun --max-restarts` restarts the job once."""
    stall_rank_at_step: list[int] = field(default_factory=list)
    """[rank, step]: that rank hangs (until killed) before that step, on the first attempt only."""
    nan_loss_at_steps: list[int] = field(default_factory=list)
    """Steps whose loss is multiplied by NaN on every rank (so are its gradients)."""
    inf_grad_at_steps: list[int] = field(default_factory=list)
    """Steps whose gradients are made infinite on the last rank only; the loss stays finite."""
    spike_at_steps: list[int] = field(default_factory=list)
    """The batches these steps draw in an uninterrupted run get their loss multiplied by `spike_factor`; keyed by
    data position, so after a rollback that skips them they do not spike again."""
    spike_factor: float = 10.0

    def __post_init__(self) -> None:
        for key in ("kill_rank_at_step", "stall_rank_at_step"):
            if getattr(self, key) and len(getattr(self, key)) != 2:
                raise ValueError(f"debug.{key}={getattr(self, key)}: give [rank, step], e.g. [1, 7]")


@dataclass
class RunConfig:
    """The run directory: config.yaml, metrics.jsonl, checkpoints/, wandb/."""

    dir: str = "???"
    name: str | None = None
    nproc_per_node: int = 0
    """Processes per job when a Hydra sweep (-m) launches torchrun itself; 0 = all GPUs, or 2 on CPU."""
    lock_stale_s: float = 300.0
    """RUN_DIR/run.lock: a holder whose heartbeat (refreshed by rank 0 every lock_stale_s / 10) is older than this,
    or whose process is gone (same host), is taken over; any other holder makes a second launch refuse to start."""

    def __post_init__(self) -> None:
        if self.lock_stale_s <= 0:
            raise ValueError(f"run.lock_stale_s={self.lock_stale_s}: must be > 0 seconds")


@dataclass
class DepthUpscaleConfig:
    """Depth up-scaling (SOLAR): the new model's layers are these half-open ranges of base layers, concatenated."""

    layers: list[list[int]] | None = None
    """e.g. [[0, 24], [8, 32]]: 32 base layers -> 48 (layers 8-23 appear twice, 8 dropped at each side of the
    seam); null = the base's layers as they are."""

    def __post_init__(self) -> None:
        for r in self.layers or []:
            if len(r) != 2 or not 0 <= r[0] < r[1]:
                raise ValueError(f"init.depth_upscale.layers: {list(r)} is not a range [start, end) with start < end")


@dataclass
class InitConfig:
    """Where a run's weights start: random (default) or an open model's (`from_hf`)."""

    from_hf: str | None = None
    """A local Hugging Face directory (config.json, safetensors, tokenizer files) of LlamaForCausalLM,
    MistralForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM or DeepseekV3ForCausalLM: the model config is derived
    from it (the `model` group's architecture keys are ignored) and its weights are loaded before step 0."""
    depth_upscale: DepthUpscaleConfig = field(default_factory=DepthUpscaleConfig)

    def __post_init__(self) -> None:
        if self.depth_upscale.layers and not self.from_hf:
            raise ValueError("init.depth_upscale.layers needs init.from_hf=HF_DIR (the base whose layers it copies)")


@dataclass
class MoENode(MoEConfig):
    """`model.moe` as written in configs: the architecture, plus keys that moved elsewhere (accepted, with a
    deprecation message; see MOVED_KEYS)."""

    ep_size: int | None = None
    expert_impl: str | None = None
    balance: str | None = None
    gamma: float | None = None
    gamma_until: float | None = None
    seq_aux_alpha: float | None = None
    aux_loss_alpha: float | None = None


@dataclass
class MTPNode(MTPConfig):
    """`model.mtp` as written in configs (moved keys accepted, see MOVED_KEYS)."""

    loss_weight: float | None = None
    loss_weight_final: float | None = None
    weight_switch: float | None = None


@dataclass
class ModelNode(ModelConfig):
    """The `model` config node: a ModelConfig (architecture) plus the execution keys it held before they moved to
    `execution.*` (still accepted, with a deprecation message; see MOVED_KEYS). `model_config()` drops them."""

    attn_backend: str | None = None
    loss_impl: str | None = None
    loss_chunk_size: int | None = None
    kernels: str | None = None
    activation_checkpointing: str | None = None
    moe: MoENode = field(default_factory=MoENode)
    mtp: MTPNode = field(default_factory=MTPNode)

    def model_config(self) -> ModelConfig:
        """The architecture alone (what the model, checkpoints and resume compatibility see)."""
        return _as_base(self, ModelConfig, moe=_as_base(self.moe, MoEConfig), mtp=_as_base(self.mtp, MTPConfig))


def _as_base(obj, cls, **override):
    """`obj` (an instance of a subclass of dataclass `cls`) as a plain `cls`, keeping only `cls`'s fields."""
    return cls(**{f.name: getattr(obj, f.name) for f in dataclasses.fields(cls) if f.init and f.name not in override},
               **override)  # fmt: skip


MOVED_KEYS = {
    **{f"model.{old}": new for old, new in MODEL_MOVED_KEYS.items()},
    "train.compile": "execution.compile",
    "train.fp8": "execution.fp8",
}
"""Keys that left `model` (architecture only) and `train` for the config that owns them: old spelling -> new."""


ALIASES = {"model.moe.ep_size"}
"""Moved keys that stay documented spellings (no deprecation message): the expert-parallel degree is set where the
experts are described, as in DeepSpeed and Megatron."""


def move_deprecated_keys(raw: DictConfig, quiet: bool = False) -> list[str]:
    """Move every old-spelling key that is set (not null) in `raw` to its new place, in place; returns one
    deprecation message per deprecated key moved (printed to stderr on rank 0 unless `quiet`)."""
    notes = []
    for old, new in MOVED_KEYS.items():
        value = OmegaConf.select(raw, old, default=None)
        if value is None or OmegaConf.select(raw, new.rsplit(".", 1)[0], default=None) is None:
            continue
        OmegaConf.update(raw, new, value, merge=False)
        OmegaConf.update(raw, old, None, merge=False)
        if old not in ALIASES:
            notes.append(f"{old} is deprecated: it moved to {new} (set {new}={value})")
    if notes and not quiet and _rank0():
        for note in notes:
            print(f"warning: {note}", file=sys.stderr, flush=True)
    return notes


def _rank0() -> bool:
    return os.environ.get("RANK", "0") == "0"


@dataclass
class InLoopEvalConfig:
    """Evaluation inside the training run (`eval`): downstream multiple-choice tasks scored by log-likelihood on
    the model being trained, without exporting (train/callbacks/downstream.py)."""

    downstream: list[str] = field(default_factory=list)
    """lm-eval multiple-choice tasks or groups, e.g. [kobest_copa, kobest_hellaswag]; logged as downstream/TASK/acc."""
    downstream_every: int = 0
    """Steps between downstream evaluations (also at the last step); 0 = train.eval_every."""
    downstream_limit: int | None = 100
    """Examples per task (the first ones of its test split); null = all."""

    def __post_init__(self) -> None:
        if self.downstream_every < 0 or (self.downstream_limit is not None and self.downstream_limit <= 0):
            raise ValueError("eval.downstream_every must be >= 0 and eval.downstream_limit > 0 (or null = all)")


@dataclass
class PretrainConfig:
    """Root of `configs/train.yaml`."""

    model: ModelNode = field(default_factory=ModelNode)
    execution: ExecutionConfig = field(default_factory=ExecutionConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    run: RunConfig = field(default_factory=RunConfig)
    debug: DebugConfig = field(default_factory=DebugConfig)
    init: InitConfig = field(default_factory=InitConfig)
    eval: InLoopEvalConfig = field(default_factory=InLoopEvalConfig)

    def __post_init__(self) -> None:
        if isinstance(self.model, ModelNode):  # from Hydra; moved keys were taken out by move_deprecated_keys
            self.model = self.model.model_config()


@dataclass
class EvalConfig:
    """`python -m train.evaluate` settings."""

    text_files: list[str] = field(default_factory=list)
    seq_len: int | None = None
    """Window length; null = the run's train.seq_len."""
    batch_size: int = 8
    device: str = "auto"


@dataclass
class EvaluateConfig:
    """Root of `configs/evaluate.yaml`."""

    run: RunConfig = field(default_factory=RunConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


@dataclass
class ExportOptions:
    """`export.*`: what the exported model directory says about itself."""

    license: str | None = None
    """License of the released weights, written into the model card (README.md front matter and text), e.g.
    apache-2.0 or cc-by-sa-4.0 (choose one compatible with the data licenses the card lists); null = not set."""


@dataclass
class ExportConfig:
    """Root of `configs/export.yaml`: `python -m train.export run.dir=DIR out=HF_DIR [export.license=ID]`."""

    run: RunConfig = field(default_factory=RunConfig)
    out: str = "???"
    tag: str | None = None
    """Checkpoint tag to export; null = latest."""
    export: ExportOptions = field(default_factory=ExportOptions)


@dataclass
class BenchConfig:
    """One synthetic-token training benchmark (forward + backward + AdamW step, one process)."""

    seq_len: int = 1024
    micro_batch_size: int = 4
    steps: int = 20
    """Timed steps."""
    warmup: int = 3
    """Untimed steps first (allocator, kernel autotuning, lazy init)."""
    peer: bool = True
    """Also time transformers' LlamaForCausalLM with the same config, weights and batch."""
    dtype: str = "auto"
    """auto (bf16 autocast on an accelerator, fp32 on cpu), fp32 or bf16 (autocast)."""
    device: str = "auto"
    """auto (the accelerator if there is one, else cpu) or a torch device string."""
    seed: int = 0
    doc_len: int = 0
    """Mean document length of the random rows: an eos (model.eos_id, else 2) at each position with probability
    1/doc_len, for model.doc_masking; 0 plants none. The peer is never doc-masked."""
    impl: str = "hangang"
    """Model timed first: hangang (ours, then the peer when bench.peer) | transformers (only the peer)."""
    compile: bool = False
    """torch.compile each decoder block of our model (as train.compile); warmup steps absorb the compile time."""
    fp8: bool = False
    """torchao float8 linears in our model's blocks (as train.fp8; Hopper GPUs)."""
    suite: str | None = None
    """Path of a suite file (configs/bench_suite/*.yaml): run each variant in a fresh subprocess, write a table."""
    table_out: str | None = None
    """Suite: Markdown file for the table; an existing file keeps everything outside the bench-suite markers."""
    find_max_micro_batch: bool = False
    """Search the largest micro-batch that fits (doubling from bench.micro_batch_size, then bisection; one
    subprocess per try); in a suite, for every variant."""
    max_micro_batch: int = 1024
    """Upper bound of that search."""
    variant_timeout_s: int = 900
    """Suite / search: a subprocess running longer is killed and recorded as a timeout."""

    def __post_init__(self) -> None:
        if self.impl not in ("hangang", "transformers"):
            raise ValueError(f"bench.impl={self.impl!r}: choose hangang or transformers")
        if self.dtype not in ("auto", "fp32", "bf16"):
            raise ValueError(f"bench.dtype={self.dtype!r}: choose auto, fp32 or bf16")
        for key in ("seq_len", "micro_batch_size", "steps"):
            if getattr(self, key) <= 0:
                raise ValueError(f"bench.{key} must be positive, got {getattr(self, key)}")
        if self.warmup < 0 or self.doc_len < 0:
            raise ValueError(f"bench.warmup and bench.doc_len must be >= 0, got {self.warmup}, {self.doc_len}")


@dataclass
class BenchRoot:
    """Schema of configs/bench.yaml (registered as `bench_schema`): an unknown key fails at compose time."""

    model: ModelNode = field(default_factory=ModelNode)
    execution: ExecutionConfig = field(default_factory=ExecutionConfig)
    """Kernels, loss and activation checkpointing of ours (compile and fp8 come from bench.compile / bench.fp8)."""
    bench: BenchConfig = field(default_factory=BenchConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    """Our model's optimizer: adamw (torch's, lr 1e-4) or muon (`optim=muon`; the peer keeps AdamW)."""

    def __post_init__(self) -> None:
        if isinstance(self.model, ModelNode):  # moved keys were taken out by move_deprecated_keys
            self.model = self.model.model_config()


@dataclass
class LmEvalConfig:
    """Root of `configs/lm_eval.yaml`."""

    run: RunConfig = field(default_factory=RunConfig)
    tasks: list[str] = field(default_factory=lambda: ["ko_nsmc_sentiment"])
    num_fewshot: int = 0
    limit: int | None = None
    """Examples per task (null = all)."""
    batch_size: int = 16
    device: str = "auto"


@dataclass
class ReportRoot:
    """Root of configs/report.yaml."""

    runs: list[str] = field(default_factory=list)
    """Run directories, or sweep directories holding them."""
    out: str | None = None
    """Where report.md and the loss-curve PNGs go."""


@dataclass
class SummaryRoot:
    """Root of configs/summary.yaml: `python -m train.summary run=RUN_DIR hf=HF_DIR [eval=EVAL_JSON]`."""

    run: str | None = None
    """The run directory (metrics.jsonl)."""
    hf: str | None = None
    """The exported Hugging Face model directory (generates a continuation from it)."""
    eval: str | None = None
    """The JSON printed by train.evaluate (optional)."""


def register_configs() -> None:
    """Register root schemas so Hydra validates every composed config against them."""
    cs = ConfigStore.instance()
    cs.store(name="train_schema", node=PretrainConfig)
    cs.store(name="evaluate_schema", node=EvaluateConfig)
    cs.store(name="export_schema", node=ExportConfig)
    cs.store(name="bench_schema", node=BenchRoot)
    cs.store(name="lm_eval_schema", node=LmEvalConfig)
    cs.store(name="report_schema", node=ReportRoot)
    cs.store(name="summary_schema", node=SummaryRoot)


register_configs()
