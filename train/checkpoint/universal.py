"""Resharded resume: a checkpoint saved with another world size or ZeRO stage is converted once to DeepSpeed's
universal format (`TAG/universal/`), which any layout of ZeRO 1-3 loads. A pipeline-parallel checkpoint is converted
by our own `pipeline_to_universal` (DeepSpeed's converter cannot read it); the routed experts of an expert-parallel
ZeRO-1/2 checkpoint by our merge inside DeepSpeed's converter (`ExpertShards`: every expert in the result)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from train.checkpoint.layout import TMP_PREFIX, UNIVERSAL, _fsync_dir, _warn, sha256_of
from train.checkpoint.pipeline_universal import pipeline_to_universal
from train.engine import distributed as dist
from train.engine.deepspeed_compat import (
    ExpertShards,
    complete_universal_folder,
    convert_to_universal,
    weights_only_loading,
)


def ensure_universal(tag_dir: Path) -> None:
    """Convert `tag_dir` to DeepSpeed's universal format in `tag_dir/universal/` once (rank 0; collective)."""
    out = tag_dir / UNIVERSAL
    if dist.rank() == 0 and not out.is_dir():
        tmp = tag_dir / (TMP_PREFIX + UNIVERSAL)
        shutil.rmtree(tmp, ignore_errors=True)
        _warn(f"{tag_dir} was saved with another layout, world size or ZeRO stage: converting it to {out} (once)")
        with weights_only_loading(tag_dir):
            if int(json.loads((tag_dir / "meta.json").read_text()).get("pp_size", 1)) > 1:
                pipeline_to_universal(tag_dir, tmp)
            else:
                convert_to_universal(tag_dir, tmp, max(1, min(8, (os.cpu_count() or 2) // 2)), _experts(tag_dir))
        complete_universal_folder(tmp)
        for path in tmp.rglob("*"):
            if path.is_file():
                sha256_of(path, sync=True)
        (tag_dir / "latest_universal").unlink(missing_ok=True)  # DeepSpeed's pointer to the temporary name; unused
        os.rename(tmp, out)  # complete once it has its final name
        _fsync_dir(tag_dir)
    dist.barrier()


def _experts(tag_dir: Path) -> ExpertShards | None:
    """How the routed experts of checkpoint `tag_dir` are split, when it is an expert-parallel ZeRO-1/2 one (else
    None: our merge reads ds_to_universal's ZeRO-1/2 fragment files)."""
    import torch

    from model.config import ModelConfig
    from model.transformer import Transformer
    from train.checkpoint.compat import saved_ep_size
    from train.engine.expert_parallel import expert_params

    meta = json.loads((tag_dir / "meta.json").read_text())
    ep = saved_ep_size(meta)
    if ep == 1 or meta.get("zero_stage") not in (1, 2):
        return None
    cfg = ModelConfig.from_dict(meta["model"])
    with torch.device("meta"):
        model = Transformer(cfg, random_init=False)
    ids = {id(p) for p in expert_params(model)}
    names = frozenset(n for n, p in model.named_parameters() if id(p) in ids)
    return ExpertShards(names, cfg.moe.n_routed_experts, int(meta["world_size"]), ep, int(meta.get("tp_size", 1)))
