"""Typed configuration of a decoder: its architecture (`ModelConfig`, the `model/` Hydra group) and how it runs
(`ExecutionConfig`)."""

from __future__ import annotations

from dataclasses import dataclass, field, fields

ATTN_BACKENDS = ("sdpa", "flash_attn", "flex", "eager")
ATTENTIONS = ("gqa", "mla")
BALANCES = ("aux_free", "aux_loss")
EXPERT_IMPLS = ("auto", "grouped_mm", "loop")
LOSS_IMPLS = ("torch", "chunked", "liger")
KERNELS = ("torch", "liger")
ACTIVATION_CHECKPOINTING = ("none", "selective", "full")

MOVED_KEYS = {
    "attn_backend": "execution.attn_backend",
    "loss_impl": "execution.loss_impl",
    "loss_chunk_size": "execution.loss_chunk_size",
    "kernels": "execution.kernels",
    "activation_checkpointing": "execution.activation_checkpointing",
    "moe.expert_impl": "execution.expert_impl",
    "moe.ep_size": "parallel.ep_size",
    "moe.balance": "train.moe.balance",
    "moe.gamma": "train.moe.gamma",
    "moe.gamma_until": "train.moe.gamma_until",
    "moe.seq_aux_alpha": "train.moe.seq_aux_alpha",
    "moe.aux_loss_alpha": "train.moe.aux_loss_alpha",
    "mtp.loss_weight": "train.mtp.loss_weight",
    "mtp.loss_weight_final": "train.mtp.loss_weight_final",
    "mtp.weight_switch": "train.mtp.weight_switch",
}
"""Keys older versions kept in the model config (checkpoint meta, YAML) -> where they live now."""


@dataclass
class MoEConfig:
    """DeepSeekMoE: shared experts plus fine-grained routed experts with sigmoid top-k routing (DeepSeek-V3)."""

    enabled: bool = False
    """false = every layer is a dense SwiGLU MLP of `model.ffn_hidden`."""
    n_routed_experts: int = 8
    n_shared_experts: int = 1
    """Always-on experts, fused into one SwiGLU of n_shared_experts * ffn_hidden (as DeepSeek and HF do)."""
    top_k: int = 2
    """Routed experts per token."""
    ffn_hidden: int = 128
    """Intermediate size of one expert (HF `moe_intermediate_size`)."""
    first_k_dense: int = 1
    """The first k layers keep a dense MLP of `model.ffn_hidden` (HF `first_k_dense_replace`)."""
    n_group: int = 1
    """Expert groups for group-limited routing; each token picks experts from only `topk_group` groups."""
    topk_group: int = 1
    route_scale: float = 1.0
    """Gates (normalised over the selected experts) are multiplied by this (HF `routed_scaling_factor`)."""

    def __post_init__(self) -> None:
        for key in ("n_routed_experts", "top_k", "ffn_hidden", "n_group", "topk_group"):
            if getattr(self, key) <= 0:
                raise ValueError(f"model.moe.{key} must be positive, got {getattr(self, key)}")
        if self.n_shared_experts < 0 or self.first_k_dense < 0:
            raise ValueError("model.moe.n_shared_experts and model.moe.first_k_dense must be >= 0")
        if self.n_routed_experts % self.n_group:
            raise ValueError(f"model.moe.n_group={self.n_group} must divide n_routed_experts={self.n_routed_experts}")
        if self.n_group > 1 and self.n_routed_experts // self.n_group < 2:
            raise ValueError("model.moe: group-limited routing needs at least 2 experts per group")
        if not 1 <= self.topk_group <= self.n_group:
            raise ValueError(f"model.moe.topk_group={self.topk_group} must be in [1, n_group={self.n_group}]")
        if self.top_k > self.topk_group * (self.n_routed_experts // self.n_group):
            raise ValueError(f"model.moe.top_k={self.top_k} exceeds the experts of {self.topk_group} groups")


@dataclass
class MTPConfig:
    """Multi-token prediction (DeepSeek-V3): `depth` sequential modules sharing the embedding and the output head."""

    depth: int = 0
    """0 disables MTP; D > 0 predicts D extra future tokens during training (never used at inference)."""

    def __post_init__(self) -> None:
        if self.depth < 0:
            raise ValueError(f"model.mtp.depth must be >= 0, got {self.depth}")


@dataclass
class ModelConfig:
    """Architecture of the decoder: what the weights mean. Two configs are compatible (a checkpoint resumes under
    another) exactly when they are equal; `name` is a label and takes no part in equality."""

    name: str = field(default="tiny", compare=False)
    """Registry name, recorded in checkpoints and exports."""
    vocab_size: int = 0
    """Embedding rows; 0 takes the tokenizer's vocabulary size at build time."""
    d_model: int = 256
    """Hidden size."""
    n_layers: int = 4
    n_heads: int = 4
    """Query heads; head_dim = d_model // n_heads unless head_dim_override is set."""
    n_kv_heads: int = 2
    """Key/value heads for grouped-query attention; must divide n_heads."""
    ffn_hidden: int = 704
    """SwiGLU intermediate size."""
    max_seq_len: int = 2048
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = True
    """Share the input embedding with the output head."""
    doc_masking: bool = False
    """Packed sequences: no attention across documents; a position right after an `eos_id` token starts a new
    document (DeepSeek-V3 packs without it, Llama 3 with it)."""
    doc_position_reset: bool = False
    """With doc_masking: RoPE positions restart at 0 in every document (Llama 3 keeps running positions)."""
    eos_id: int = -1
    """Document separator for doc_masking; -1 takes the tokenizer's eos id at build time."""
    init_std: float = 0.02
    attention: str = "gqa"
    """gqa (Llama: q/k/v/o with n_kv_heads) | mla (DeepSeek-V2/V3 multi-head latent attention; ignores n_kv_heads)."""
    q_lora_rank: int | None = None
    """MLA: rank of the query compression (null = a full q_proj, as in DeepSeek-V2-Lite)."""
    kv_lora_rank: int = 64
    """MLA: width of the compressed KV latent (normalised by kv_a_layernorm)."""
    qk_nope_head_dim: int = 32
    """MLA: per-head query/key dims without RoPE."""
    qk_rope_head_dim: int = 16
    """MLA: decoupled RoPE dims (one RoPE key shared by all heads)."""
    v_head_dim: int = 32
    """MLA: per-head value dims."""
    moe: MoEConfig = field(default_factory=MoEConfig)
    mtp: MTPConfig = field(default_factory=MTPConfig)
    head_dim_override: int | None = None
    """GQA per-head width when it is not d_model // n_heads (Qwen3, Mistral); null = d_model // n_heads."""
    qkv_bias: bool = False
    """Biases on the q/k/v projections (Qwen2; o_proj stays bias-free)."""
    qk_norm: bool = False
    """RMSNorm (weights of head_dim) over every query and key head before RoPE (Qwen3: `q_norm`, `k_norm`)."""
    sliding_window: int | None = None
    """HF sliding-window span (Mistral), kept for export. Attention here is full causal, which equals sliding-window
    attention only within the window, so max_seq_len must not exceed it."""
    hf_architecture: str = field(default="", compare=False)
    """The transformers class `train.export` writes (a model imported with init.from_hf keeps its family); empty =
    chosen from the architecture (LlamaForCausalLM or DeepseekV3ForCausalLM). A label: not part of equality."""

    def __post_init__(self) -> None:
        # Checkpoint meta and plain YAML give nested dicts; OmegaConf gives the dataclasses.
        if isinstance(self.moe, dict):
            self.moe = MoEConfig(**self.moe)
        if isinstance(self.mtp, dict):
            self.mtp = MTPConfig(**self.mtp)
        if self.attention not in ATTENTIONS:
            raise ValueError(f"model.attention={self.attention!r}: choose one of {ATTENTIONS}")
        if self.attention == "mla":
            for key in ("kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim"):
                if getattr(self, key) <= 0:
                    raise ValueError(f"model.{key} must be positive for model.attention=mla")
            if self.qk_rope_head_dim % 2:
                raise ValueError("model.qk_rope_head_dim must be even for RoPE")
            if self.q_lora_rank is not None and self.q_lora_rank <= 0:
                raise ValueError("model.q_lora_rank must be positive or null")
        if self.head_dim_override is None and self.d_model % self.n_heads:
            raise ValueError(f"model.d_model={self.d_model} is not divisible by model.n_heads={self.n_heads}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"model.n_heads={self.n_heads} is not divisible by model.n_kv_heads={self.n_kv_heads}")
        if self.head_dim <= 0 or self.head_dim % 2:
            raise ValueError(f"model head_dim={self.head_dim} must be positive and even for RoPE")
        if self.attention == "mla" and (self.qkv_bias or self.qk_norm or self.head_dim_override is not None):
            raise ValueError(
                "model.qkv_bias, model.qk_norm and model.head_dim_override are GQA options (attention=gqa)"
            )
        if self.sliding_window is not None and self.sliding_window < self.max_seq_len:
            raise ValueError(
                f"model.sliding_window={self.sliding_window} < model.max_seq_len={self.max_seq_len}: sliding-window "
                "attention is not implemented (full causal attention equals it only within the window); set "
                f"model.max_seq_len<={self.sliding_window}"
            )
        for key in ("n_layers", "n_heads", "n_kv_heads", "ffn_hidden", "max_seq_len", "d_model"):
            if getattr(self, key) <= 0:
                raise ValueError(f"model.{key} must be positive, got {getattr(self, key)}")
        if self.doc_position_reset and not self.doc_masking:
            raise ValueError("model.doc_position_reset=true needs model.doc_masking=true (documents come from it)")
        if self.eos_id < -1:
            raise ValueError(f"model.eos_id must be a token id or -1 (= from the tokenizer), got {self.eos_id}")
        if self.vocab_size < 0:
            raise ValueError(f"model.vocab_size must be >= 0 (0 = from tokenizer), got {self.vocab_size}")

    @property
    def head_dim(self) -> int:
        return self.head_dim_override if self.head_dim_override is not None else self.d_model // self.n_heads

    @property
    def rope_dim(self) -> int:
        """Dims rotated by RoPE per head."""
        return self.qk_rope_head_dim if self.attention == "mla" else self.head_dim

    def is_moe_layer(self, i: int) -> bool:
        return self.moe.enabled and i >= self.moe.first_k_dense

    @classmethod
    def from_dict(cls, d: dict) -> ModelConfig:
        """Rebuild from `asdict(cfg)` (checkpoint meta); keys added after the checkpoint was written take defaults,
        keys that moved out of the model config (`MOVED_KEYS`, written by older versions) are dropped."""
        d = {k: v for k, v in d.items() if k not in MOVED_KEYS}
        for sub, sub_cls in (("moe", MoEConfig), ("mtp", MTPConfig)):
            if isinstance(d.get(sub), dict):
                d[sub] = {k: v for k, v in d[sub].items() if f"{sub}.{k}" not in MOVED_KEYS}
                unknown = set(d[sub]) - {f.name for f in fields(sub_cls)}
                if unknown:
                    raise ValueError(f"unknown model.{sub} config keys {sorted(unknown)}")
        unknown = set(d) - {f.name for f in fields(cls)}
        if unknown:
            raise ValueError(f"unknown model config keys {sorted(unknown)}")
        return cls(**d)


@dataclass
class ExecutionConfig:
    """How the model runs: kernels, memory trade-offs and compilation. Never changes what the weights mean, so it
    may differ between a run and its resume."""

    attn_backend: str = "sdpa"
    """sdpa (default), flash_attn (needs the flash-attn package and a CUDA GPU), flex (torch FlexAttention; compiled on
    CUDA, forward-only on CPU) or eager (reference)."""
    loss_impl: str = "torch"
    """Output head + cross-entropy: torch (full (B*T, V) fp32 logits) | chunked (pure PyTorch, `loss_chunk_size`
    rows of logits at a time, recomputed in backward) | liger (liger-kernel's fused Triton kernel; CUDA only)."""
    loss_chunk_size: int = 4096
    """Rows (tokens) per logits chunk for loss_impl=chunked: one (chunk, V) fp32 block is the peak extra memory."""
    kernels: str = "torch"
    """RMSNorm, SwiGLU (dense and experts) and GQA RoPE: torch (reference) | liger (liger-kernel Triton kernels;
    CUDA only)."""
    activation_checkpointing: str = "none"
    """none | selective (keep matmul and attention outputs, recompute norms, RoPE and activations in backward) |
    full (keep only each block's input; recompute the whole block)."""
    expert_impl: str = "auto"
    """Routed-expert matmuls: grouped_mm (one torch._grouped_mm per projection, no host sync), loop (one matmul
    pair per expert), or auto (grouped_mm on CPU and on CUDA in bf16, where PyTorch has the kernel; else loop)."""
    compile: bool = False
    """torch.compile each decoder block (not the whole model); parameter names and checkpoints are unchanged."""
    fp8: bool = False
    """FP8 matmuls in the blocks through torchao float8 training (Hopper GPUs; needs torchao)."""

    def __post_init__(self) -> None:
        for key, allowed in (
            ("attn_backend", ATTN_BACKENDS),
            ("loss_impl", LOSS_IMPLS),
            ("kernels", KERNELS),
            ("activation_checkpointing", ACTIVATION_CHECKPOINTING),
            ("expert_impl", EXPERT_IMPLS),
        ):
            if getattr(self, key) not in allowed:
                raise ValueError(f"execution.{key}={getattr(self, key)!r}: choose one of {allowed}")
        if self.loss_chunk_size <= 0:
            raise ValueError(f"execution.loss_chunk_size must be positive, got {self.loss_chunk_size}")


def check_execution(model: ModelConfig, execution: ExecutionConfig) -> None:
    """Refuse execution options the architecture cannot run with."""
    if model.attention == "mla" and execution.attn_backend == "flash_attn":
        if model.v_head_dim > model.qk_nope_head_dim + model.qk_rope_head_dim:
            raise ValueError(
                "execution.attn_backend=flash_attn needs model.v_head_dim <= qk_nope_head_dim + qk_rope_head_dim "
                "(v is zero-padded to the qk head dim); use execution.attn_backend=flex or sdpa"
            )
