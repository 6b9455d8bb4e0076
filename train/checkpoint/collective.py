"""The collective checkpoint save and load of a training job (every rank calls them together).

A save writes into `.tmp-TAG/` (rank 0: full weights, meta, bill of materials; every rank: its RNG state and its
DeepSpeed files), each rank fsyncs and hashes the files it wrote, and rank 0 commits (train.checkpoint.layout).
Every torch.load of a checkpoint file, DeepSpeed's included, runs with weights_only=True.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from data_pipeline.shards import MANIFEST
from train.checkpoint.layout import (
    TMP_PREFIX,
    UNIVERSAL,
    FileOp,
    _no_op,
    clear_interrupted,
    commit,
    sha256_of,
    tag_for,
)
from train.checkpoint.rng import rng_state, set_rng_state
from train.checkpoint.universal import ensure_universal
from train.engine import distributed as dist
from train.engine.deepspeed_compat import (
    count_checkpoint_writes,
    fix_zero3_universal_load,
    model_states_from_every_tensor_parallel_rank,
    weights_only_loading,
)


def save(
    engine,
    ckpt_dir: Path,
    step: int,
    client_state: dict,
    meta: dict,
    full_weights: dict | None,
    keep_last: int = 0,
    keep_every: int = 0,
    file_op: FileOp | None = None,
) -> None:
    """Collective, crash-safe save, then retention. `file_op` (rank 0) is called before each file operation."""
    from safetensors.torch import save_file

    tag = tag_for(step)
    tmp = ckpt_dir / (TMP_PREFIX + tag)
    rank = dist.rank()
    ops = (file_op or _no_op) if rank == 0 else _no_op
    written: list[Path] = []  # this rank's files, which it fsyncs itself (on NFS only the writer's fsync counts)
    if rank == 0:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        clear_interrupted(ckpt_dir, ops)
        ops(f"mkdir {tmp.name}")
        tmp.mkdir()
        ops("model.safetensors")
        save_file(full_weights, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        ops("meta.json")
        (tmp / "meta.json").write_text(json.dumps({**meta, "step": step, "tag": tag}, indent=2))
        written += [tmp / "model.safetensors", tmp / "meta.json"]
        # The bill of materials travels with the weights, so a checkpoint alone shows what it was trained on.
        bom = Path(meta["data_path"]) / MANIFEST if meta.get("data_path") else None
        if bom is not None and bom.is_file():
            ops("bom.json")
            shutil.copyfile(bom, tmp / "bom.json")
            written.append(tmp / "bom.json")
    dist.barrier()
    ops(f"rng_rank{rank}.pt")
    torch.save(rng_state(), tmp / f"rng_rank{rank}.pt")
    written.append(tmp / f"rng_rank{rank}.pt")
    with count_checkpoint_writes(engine, lambda path: ops(path.name)) as ds_files:
        with model_states_from_every_tensor_parallel_rank(engine):
            engine.save_checkpoint(str(ckpt_dir), tag=tmp.name, client_state=client_state, save_latest=False)
    written += ds_files
    dist.barrier()
    # Every rank fsyncs and hashes the files it wrote (in parallel; no rank lists a directory others write into).
    shares = dist.all_gather_object({str(p.relative_to(tmp)): sha256_of(p, sync=True) for p in written})
    if rank == 0:
        files = {name: info for share in shares for name, info in share.items()}
        commit(ckpt_dir, tmp, tag, step, files, keep_last, keep_every, ops)
    dist.barrier()


def load(engine, ckpt_dir: Path, tag: str) -> dict:
    """Restore model, optimizer, LR schedule and this rank's RNG; return the client state.

    An engine built with `load_universal` (the world size or ZeRO stage changed since the save) reads DeepSpeed's
    universal checkpoint, which reshards parameters and optimizer states to this job's layout.
    """
    tag_dir = ckpt_dir / tag
    load_dir, load_tag = ckpt_dir, tag
    if engine.load_universal_checkpoint():
        ensure_universal(tag_dir)
        load_dir, load_tag = tag_dir, UNIVERSAL
    # no_grad: a pipeline engine re-broadcasts its tied weights in place while loading.
    with weights_only_loading(tag_dir), torch.no_grad():
        path, client_state = engine.load_checkpoint(
            str(load_dir), tag=load_tag, load_optimizer_states=True, load_lr_scheduler_states=True
        )
        if path is None:
            raise FileNotFoundError(f"DeepSpeed could not load checkpoint {tag_dir}")
        if engine.load_universal_checkpoint() and engine.zero_optimization_partition_weights():
            fix_zero3_universal_load(engine, tag_dir / UNIVERSAL / "zero")
        if engine.load_universal_checkpoint():
            _match_schedule_to_groups(engine.lr_scheduler, tag_dir)
        # A rank that did not exist at save time (more ranks now) keeps its seeded RNG; training draws none on CPU.
        rng_file = tag_dir / f"rng_rank{dist.rank()}.pt"
        if rng_file.is_file():
            set_rng_state(torch.load(rng_file, weights_only=True))
    return client_state


def _match_schedule_to_groups(scheduler, where: Path) -> None:
    """A resharded resume may have another number of optimizer groups than the saved run (the expert-parallel
    group exists only with ep_size > 1), but the LR schedule's saved state holds one base LR per saved group: every
    group starts from the same LR (`optim.lr`), so give each group of this run that one."""
    n = len(scheduler.optimizer.param_groups)
    if len(scheduler.base_lrs) == n:
        return
    if len(set(scheduler.base_lrs)) != 1:
        raise ValueError(f"{where}: optimizer groups with different base LRs {scheduler.base_lrs} cannot be regrouped")
    scheduler.base_lrs = scheduler.base_lrs[:1] * n
    scheduler._last_lr = scheduler._last_lr[:1] * n
