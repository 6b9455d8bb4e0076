"""Tensor and sequence parallelism on DeepSpeed's own implementations, applied to our modules from outside.

Tensor parallelism is DeepSpeed AutoTP (`"tensor_parallel": {"autotp_size": N}`) with a partition plan for our
parameter names: attention projections (GQA q/k/v, MLA q_b/kv_b) and the gate/up projections of the dense MLP and
the shared experts are column-parallel, o_proj and down_proj row-parallel; MLA's small latent projections
(q_a, kv_a), the router and the norms stay replicated (the per-head q/k norms with their gradient summed over the
group); routed experts stay whole (expert parallelism is train/engine/expert_parallel.py). The output head is
vocabulary-parallel (AutoTP's `vocab_parallel_lm_head`; a tied embedding shares the head's shard, an untied one
stays replicated) and the loss is DeepSpeed's vocabulary-parallel cross-entropy on each rank's logit shard: the
(B, T, V) logits are never gathered in training. DeepSpeed reduces gradients over the data-parallel group
(world / tp) and counts replicated parameters once in the gradient norm.

Sequence parallelism is DeepSpeed Ulysses (`deepspeed.sequence.layer.DistributedAttention`) around our attention
kernel call (`Attention.attention`): each rank projects its shard of the sequence, one all-to-all gives it the
whole sequence for 1/sp of the heads, the kernel runs with the mask of the whole sequence, and the reverse
all-to-all brings its shard back. The model itself knows only its `SequenceShard` (which positions are its own).
"""

from __future__ import annotations

import functools

import torch.distributed as dist
from torch import nn

from model.attention import Attention, MLAttention, attend
from model.loss import IGNORE_INDEX
from model.transformer import SequenceShard

TP_PARTITION = {
    "use_default_specs": False,
    "layer_specs": [
        {
            "patterns": [r".*\.(q_proj|k_proj|v_proj|q_b_proj|kv_b_proj|gate_proj|up_proj)\.weight$"],
            "partition_type": "column",
        },
        {"patterns": [r".*\.(o_proj|down_proj)\.weight$"], "partition_type": "row"},
        # Qwen3's per-head q/k RMSNorm weights are replicated but each rank normalises only its heads: AutoTP sums
        # their gradients over the tensor-parallel group.
        {"patterns": [r".*\.(q_norm|k_norm)\.weight$"], "partition_type": "skip", "grad_allreduce": True},
    ],
}
"""AutoTP's partition plan for our parameter names (DeepSpeed `tensor_parallel.partition_config`). Router
weights are named `gate.weight` and MLA latents `q_a_proj` / `kv_a_proj_with_mqa`: no pattern, so replicated;
the q/k norms are replicated too, with their gradient summed over the group."""


def tensor_parallel_config(tp_size: int) -> dict:
    """The `tensor_parallel` section of the DeepSpeed config."""
    return {"autotp_size": tp_size, "partition_config": TP_PARTITION, "vocab_parallel_lm_head": True}


def init_tensor_parallel(tp_size: int):
    """DeepSpeed's tensor-parallel and data-parallel groups (collective); returns the `mpu` for deepspeed.initialize.
    Groups are consecutive ranks: world 4, tp 2 -> tensor-parallel [0, 1], [2, 3]; data-parallel [0, 2], [1, 3]."""
    from deepspeed.utils import groups

    groups._init_tp_mesh_device(tensor_model_parallel_size=tp_size)
    return groups


def shard_tensor_parallel(model: nn.Module, tp_size: int) -> None:
    """AutoTP with this plan applied now, before deepspeed.initialize (which then has nothing left to shard):
    init.from_hf builds the model on the meta device and shards it here, so each rank allocates and reads only its
    own shards (train/engine/zero_load.py). Collective the first time (creates the tensor-parallel groups)."""
    from train.engine.deepspeed_compat import autotp_before_initialize

    init_tensor_parallel(tp_size)
    autotp_before_initialize(model, tensor_parallel_config(tp_size))


def tensor_parallel_slices(model: nn.Module) -> dict[str, tuple[int, int, int]]:
    """For each sharded parameter of an AutoTP model: (dim, start, stop), the slice of the whole tensor this rank
    holds (column-parallel weights and biases and the vocabulary-parallel embedding / head: dim 0; row-parallel
    weights: dim 1). Replicated parameters are absent."""
    from deepspeed.utils import groups

    from train.engine.deepspeed_compat import autotp_slice

    rank = groups.get_tensor_model_parallel_rank()
    out = {}
    for name, p in model.named_parameters():
        part = autotp_slice(p, rank)
        if part is not None:
            out[name] = part
    return out


def prepare_tensor_parallel(model: nn.Module) -> None:
    """Before deepspeed.initialize: AutoTP's vocabulary-parallel head installs its own loss on `loss_function`
    (a Hugging Face hook); ours is computed by the head itself (`adopt_vocab_parallel_head`), so give it a slot."""
    model.loss_function = None


def adopt_vocab_parallel_head(model: nn.Module) -> None:
    """After deepspeed.initialize: the head AutoTP built computes our loss (labels, n_valid) on its logit shard, and
    MLA's shared RoPE key gets its whole gradient."""
    from deepspeed.module_inject.layers import VocabParallelLinear

    head = model.lm_head
    if not isinstance(head, VocabParallelLinear):
        raise RuntimeError(f"AutoTP left lm_head as {type(head).__name__}, not vocabulary-parallel")
    head.__class__ = _vocab_parallel_head_class()
    model._modules.pop("loss_function", None)
    model.__dict__.pop("loss_function", None)
    from deepspeed.module_inject.layers import ColumnParallel

    group = head.mp_group
    for module in model.modules():
        if isinstance(module, MLAttention):
            # The RoPE key feeds every head, and this rank holds only some: sum its gradient over the group.
            module.shared_key = functools.partial(ColumnParallel.apply, group)


_HEAD_CLASS = None


def _vocab_parallel_head_class():
    """DeepSpeed's VocabParallelLinear with our LMHead's call: (x) -> logits, (x, labels[, n_valid]) -> mean CE."""
    global _HEAD_CLASS
    if _HEAD_CLASS is not None:
        return _HEAD_CLASS
    from deepspeed.module_inject.layers import GatherFromTensorParallelRegion, VocabParallelLinear
    from deepspeed.sequence.cross_entropy import vocab_parallel_cross_entropy

    class VocabParallelLMHead(VocabParallelLinear):
        def forward(self, x, labels=None, n_valid=None):
            logits = super().forward(x)  # (B, T, V / tp): this rank's vocabulary shard
            if labels is None:  # evaluation and generation want whole logits
                return GatherFromTensorParallelRegion.apply(self.mp_group, logits, self._partition_sizes)
            total = vocab_parallel_cross_entropy(
                logits.float(),
                labels,
                tp_group=self.mp_group,
                vocab_start_index=self.vocab_start_index,
                vocab_end_index=self.vocab_end_index,
                global_vocab_size=self.vocab_size,
                ignore_index=IGNORE_INDEX,
                reduction="sum",
            )
            n = (labels != IGNORE_INDEX).sum() if n_valid is None else n_valid
            return total / n.clamp_min(1)

    _HEAD_CLASS = VocabParallelLMHead
    return _HEAD_CLASS


def init_sequence_parallel(sp_size: int):
    """This rank's sequence-parallel group (consecutive ranks; collective: every rank creates every group) and its
    `SequenceShard`."""
    world, rank = dist.get_world_size(), dist.get_rank()
    mine = None
    for start in range(0, world, sp_size):
        group = dist.new_group(list(range(start, start + sp_size)))
        if start <= rank < start + sp_size:
            mine = group
    return mine, SequenceShard(sp_size, rank % sp_size)


class UlyssesAttention:
    """`attend` behind DeepSpeed's DistributedAttention: q (B, nh, T/sp, d) of this shard -> the same shape, computed
    on the whole sequence for nh/sp heads (kv heads likewise: sp divides n_kv_heads, so GQA groups stay whole)."""

    def __init__(self, group) -> None:
        from deepspeed.sequence.layer import DistributedAttention

        # (B, T, H, D) layout: batch dim 0, heads scattered (2), sequence gathered (1).
        self.dist_attn = DistributedAttention(self._local, group, scatter_idx=2, gather_idx=1)

    @staticmethod
    def _local(q, k, v, backend, scale, mask, flash):
        y = attend(backend, q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), scale, mask, flash)
        return y.transpose(1, 2)

    def __call__(self, backend, q, k, v, scale, mask=None, flash=None):
        q, k, v = (t.transpose(1, 2).contiguous() for t in (q, k, v))
        return self.dist_attn(q, k, v, 0, None, backend, scale, mask, flash).transpose(1, 2)


def wrap_attention(model: nn.Module, group) -> None:
    """Route every attention module's kernel call through Ulysses over `group` (parameters unchanged)."""
    ulysses = UlyssesAttention(group)
    for module in model.modules():
        if isinstance(module, (Attention, MLAttention)):
            module.attention = ulysses
