"""Building a model whose weights come from files, each rank reading only what it holds: under ZeRO-3 the model
is constructed partitioned (`deepspeed.zero.Init`) and every parameter's local partition is filled from its own
slice of the source, so no rank ever holds the whole model. Under tensor parallelism (with or without ZeRO-3) it is
built on the meta device and sharded by AutoTP there; only then are this rank's shards allocated and filled, each
from its own rows or columns of the source. Otherwise each rank fills its full replica.

Why meta + early AutoTP for tensor parallelism: AutoTP normally shards inside deepspeed.initialize, after the
optimizer is built and the model moved to its device, so the whole model would have to exist (and be read) on every
rank first, and loading after initialize would miss the optimizer's master copies. Sharding the meta model first
costs no memory, keeps DeepSpeed's own partitioning (shard sizes, vocabulary-parallel head, checkpoint metadata),
and the optimizer is then built from loaded shards as for any other model."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

FlatReader = Callable[[str, int, int], torch.Tensor]
"""read(name, a, b): elements [a, b) of parameter or buffer `name`, flattened."""
PartReader = Callable[[str, int, int, int], torch.Tensor]
"""read(name, dim, a, b): parameter or buffer `name` restricted to [a, b) along dim."""


def construct(build: Callable[[], nn.Module], ds_config: dict | None, tp_size: int = 1) -> nn.Module:
    """tp_size > 1: built on the meta device, sharded by AutoTP, then only this rank's shards allocated
    (uninitialised: fill them with `load_tensor_parallel`; under ZeRO-3 too, whose engine partitions the shards
    over the data-parallel ranks). Otherwise, with ds_config (a ZeRO-3 job), inside `deepspeed.zero.Init`: each
    module's parameters are partitioned over the ranks as soon as it is built (at most one module's full weights
    exist at a time); else build() as is. Collective when it creates process groups."""
    if tp_size > 1:
        from train.engine.model_parallel import shard_tensor_parallel

        with torch.device("meta"):
            module = build()
        shard_tensor_parallel(module, tp_size)
        materialize(module, torch.device("cpu"))
        return module
    if ds_config is not None:
        import deepspeed

        with deepspeed.zero.Init(config_dict_or_path=ds_config):
            return build()
    return build()


def materialize(module: nn.Module, device: torch.device) -> None:
    """Give every meta parameter and buffer uninitialised storage on `device`. Parameters keep their identity and
    attributes (AutoTP's hooks and metadata, ties); `Module.to_empty` would make new ones. Buffers derived from
    the config (RoPE tables) are rebuilt by their module's `_apply`."""
    for p in module.parameters():  # tied parameters once
        if p.is_meta:
            attrs = dict(p.__dict__)
            torch.utils.swap_tensors(p, nn.Parameter(torch.empty(p.shape, dtype=p.dtype, device=device),
                                                     requires_grad=p.requires_grad))  # fmt: skip
            p.__dict__.clear()  # swap_tensors swapped the attribute dicts too
            p.__dict__.update(attrs)
    module._apply(lambda t: torch.empty_like(t, device=device) if t.is_meta else t)


@torch.no_grad()
def load_tensor_parallel(module: nn.Module, read: PartReader) -> int:
    """Fill a model built by `construct(..., tp_size > 1)`: each sharded parameter from its slice of the source
    (`model_parallel.tensor_parallel_slices`), replicated ones and persistent buffers whole. Returns the number of
    parameter elements this rank read."""
    from train.engine.model_parallel import tensor_parallel_slices

    slices = tensor_parallel_slices(module)
    n = 0
    for name, p in module.named_parameters():
        dim, start, stop = slices.get(name, (0, 0, p.shape[0]))
        value = read(name, dim, start, stop)
        p.copy_(value.view_as(p))
        n += value.numel()
    state = module.state_dict(keep_vars=True)
    for name, b in module.named_buffers():
        if name in state and not isinstance(b, nn.Parameter):
            b.copy_(read(name, 0, 0, b.shape[0]).view_as(b))
    return n


@torch.no_grad()
def load_parameters(module: nn.Module, read: FlatReader) -> int:
    """Fill every parameter (this rank's ZeRO-3 partition only, when partitioned) and persistent buffer from
    `read`; returns the number of elements this rank read. Call before `deepspeed.initialize`, so the optimizer's
    master weights are made from the loaded values."""
    n = 0
    for name, p in module.named_parameters():  # tied parameters once
        if hasattr(p, "ds_id"):
            # DeepSpeed's layout (partition_parameters._partition_param): rank r of the partition group holds the
            # flat elements [r * part, (r + 1) * part), the last rank padded past ds_numel.
            part = p.ds_tensor.ds_numel
            start = part * p.ds_zero_partition_rank
            stop = min(start + part, p.ds_numel)
            if start < stop:
                p.ds_tensor.narrow(0, 0, stop - start).copy_(read(name, start, stop))
                n += stop - start
        else:
            p.data.copy_(read(name, 0, p.numel()).view_as(p))
            n += p.numel()
    state = module.state_dict(keep_vars=True)
    for name, b in module.named_buffers():
        if name in state and not isinstance(b, nn.Parameter):
            b.copy_(read(name, 0, b.numel()).view_as(b))
    return n
