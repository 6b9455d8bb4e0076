"""Building a model whose weights come from files, each rank reading only what it holds: under ZeRO-3 the model
is constructed partitioned (`deepspeed.zero.Init`) and every parameter's local partition is filled from its own
slice of the source, so no rank ever holds the whole model; otherwise each rank fills its full replica."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

FlatReader = Callable[[str, int, int], torch.Tensor]
"""read(name, a, b): elements [a, b) of parameter or buffer `name`, flattened."""


def construct(build: Callable[[], nn.Module], ds_config: dict | None) -> nn.Module:
    """build() as is, or (ds_config of a ZeRO-3 job) inside `deepspeed.zero.Init`: each module's parameters are
    partitioned over the ranks as soon as it is built (at most one module's full weights exist at a time)."""
    if ds_config is None:
        return build()
    import deepspeed

    with deepspeed.zero.Init(config_dict_or_path=ds_config):
        return build()


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
