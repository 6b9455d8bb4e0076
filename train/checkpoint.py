"""DeepSpeed checkpoints plus what resuming and exporting need, written so that a crash never leaves a bad `latest`.

Layout of RUN_DIR/checkpoints/:
    latest                      the newest complete tag (moved last, by an atomic rename)
    step_00000050/              one tag per saved step
        mp_rank_*_model_states.pt, *_optim_states.pt   DeepSpeed: model, optimizer, LR schedule, client state
        model.safetensors       full fp32 weights with our parameter names (read by evaluate and export)
        meta.json               step, model config, tokenizer sha256, batch layout, ZeRO stage, world size
        rng_rank{R}.pt          each rank's torch / numpy / python RNG states
        bom.json                the training data's bill of materials (data.path/manifest.json, copied)
        manifest.json           size and sha256 of every file above; written last, once all ranks have finished
        universal/              DeepSpeed universal checkpoint, made on demand when the world size or ZeRO stage changes
    .tmp-step_00000060/         a save in progress (or one a crash interrupted; removed by the next save)

A save writes into `.tmp-TAG/`, fsyncs every file, writes the manifest, renames the directory to `TAG/` and only then
moves `latest`. On resume, a checkpoint whose files do not match its manifest is skipped with a warning and the one
before it is used. Every torch.load of a checkpoint file (DeepSpeed's included) runs with weights_only=True.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import pickle
import random
import re
import shutil
import signal
import sys
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from data_pipeline.shards import MANIFEST
from model.config import ModelConfig

CKPT_MANIFEST = "manifest.json"
TMP_PREFIX = ".tmp-"
UNIVERSAL = "universal"
TAG_RE = re.compile(r"^step_(\d+)$")
FORCE_WEIGHTS_ONLY = "TORCH_FORCE_WEIGHTS_ONLY_LOAD"

SHAPE_KEYS = (
    "vocab_size",
    "d_model",
    "n_layers",
    "n_heads",
    "n_kv_heads",
    "ffn_hidden",
    "tie_embeddings",
    "attention",
    "q_lora_rank",
    "kv_lora_rank",
    "qk_nope_head_dim",
    "qk_rope_head_dim",
    "v_head_dim",
    "moe.enabled",
    "moe.n_routed_experts",
    "moe.n_shared_experts",
    "moe.ffn_hidden",
    "moe.first_k_dense",
    "mtp.depth",
)
"""Model fields a checkpoint's weights depend on (dotted for nested configs); resuming with another value fails."""


def _field(obj, dotted: str, default=None):
    """Value of a dotted field in a dataclass or a (meta) dict; `default` where a dict lacks it."""
    for part in dotted.split("."):
        if isinstance(obj, dict):
            if part not in obj:
                return default
            obj = obj[part]
        else:
            obj = getattr(obj, part)
    return obj


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def step_of(tag: str) -> int | None:
    m = TAG_RE.match(tag)
    return int(m.group(1)) if m else None


def _warn(message: str) -> None:
    """Print once per job (rank 0; plan_run runs before the process group exists, so RANK is read from the env)."""
    if os.environ.get("RANK", "0") == "0":
        print(f"[checkpoint] {message}", file=sys.stderr, flush=True)


def _fsync_dir(path: Path) -> None:
    """Make a rename or a new entry in `path` durable (the file's own fsync does not cover its directory entry)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_synced(path: Path, text: str) -> None:
    with open(path, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def _sha256(path: Path, sync: bool = False) -> dict:
    """Size and sha256 of a file; with `sync`, fsynced first, so the manifest never vouches for unwritten bytes."""
    h, size = hashlib.sha256(), 0
    with open(path, "rb") as f:
        if sync:
            os.fsync(f.fileno())
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
            size += len(chunk)
    return {"size": size, "sha256": h.hexdigest()}


def verify(tag_dir: Path, hashes: bool = True) -> str | None:
    """None when `tag_dir` holds every file its manifest lists with the listed size (and sha256); else what is wrong."""
    if not tag_dir.is_dir():
        return "the directory does not exist"
    manifest = tag_dir / CKPT_MANIFEST
    if not manifest.is_file():
        return f"no {CKPT_MANIFEST} (its save did not finish)"
    try:
        files = json.loads(manifest.read_text())["files"]
    except (ValueError, KeyError, TypeError) as err:
        return f"unreadable {CKPT_MANIFEST} ({err})"
    for name, want in sorted(files.items()):
        path = tag_dir / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != want["size"]:
            return f"{name} has {path.stat().st_size} bytes, its manifest says {want['size']}"
        if hashes and _sha256(path)["sha256"] != want["sha256"]:
            return f"{name} does not match the sha256 in its manifest"
    return None


def _tags(ckpt_dir: Path) -> list[str]:
    """Checkpoint tags under `ckpt_dir` (complete or not), oldest first."""
    found = [p.name for p in ckpt_dir.glob("step_*") if p.is_dir() and TAG_RE.match(p.name)]
    return sorted(found, key=step_of)


def pointer_tag(ckpt_dir: Path) -> str | None:
    """The tag `latest` names, unchecked."""
    pointer = ckpt_dir / "latest"
    return pointer.read_text().strip() if pointer.is_file() else None


def latest_tag(ckpt_dir: Path, verify_hashes: bool = True) -> str | None:
    """The newest complete checkpoint: the one `latest` names if it matches its manifest, else the newest older one
    that does (each one skipped is reported); None when there is none.

    Tags newer than `latest` are never chosen: they belong to an abandoned history (a resume from an older checkpoint).
    """
    ckpt_dir = Path(ckpt_dir)
    tags = _tags(ckpt_dir)[::-1]
    named = pointer_tag(ckpt_dir)
    if named is not None and step_of(named) is not None:
        tags = [named] + [t for t in tags if step_of(t) < step_of(named)]
    for tag in tags:
        reason = verify(ckpt_dir / tag, verify_hashes)
        if reason is None:
            return tag
        _warn(f"ignoring checkpoint {ckpt_dir / tag}: {reason}; trying the one before")
    return None


def read_meta(ckpt_dir: Path, tag: str) -> dict:
    return json.loads((ckpt_dir / tag / "meta.json").read_text())


def needs_universal(meta: dict, world_size: int, zero_stage: int, where: Path) -> bool:
    """Whether resuming `meta`'s checkpoint with this world size and ZeRO stage needs DeepSpeed's universal format."""
    saved = (meta.get("world_size"), meta.get("zero_stage"))
    if saved == (world_size, zero_stage):
        return False
    if saved[1] == 0 and zero_stage == 0:
        return False  # ZeRO-0 keeps whole optimizer states, which any number of ranks loads as they are
    if saved[1] == 0 or zero_stage == 0:
        raise ValueError(
            f"cannot resume {where} (ZeRO-{saved[1]}, {saved[0]} ranks) with deepspeed.zero_stage={zero_stage} on "
            f"{world_size} ranks: resharding goes through DeepSpeed's universal checkpoint, which needs ZeRO 1-3 on "
            f"both sides. Resume with deepspeed.zero_stage={saved[1]}"
        )
    return True


def check_compatible(meta: dict, model: ModelConfig, tokenizer_sha256: str, where: Path) -> None:
    """Refuse to resume a checkpoint of another model shape or tokenizer, naming every difference."""
    saved = meta["model"]
    # Checkpoints written before a field existed hold its default (e.g. dense GQA before MLA and MoE).
    defaults = ModelConfig()
    diffs = [
        f"model.{k}: checkpoint {_field(saved, k, _field(defaults, k))!r}, config {_field(model, k)!r}"
        for k in SHAPE_KEYS
        if _field(saved, k, _field(defaults, k)) != _field(model, k)
    ]
    if diffs:
        raise ValueError(
            f"cannot resume from {where}: it holds a model of another shape ({'; '.join(diffs)}). "
            "Use the model config it was trained with, or a new run.dir"
        )
    saved_ep = _field(saved, "moe.ep_size", 1) if _field(saved, "moe.enabled", False) else 1
    ep = model.moe.ep_size if model.moe.enabled else 1
    if saved_ep != ep:
        raise ValueError(
            f"cannot resume from {where} with model.moe.ep_size={ep}: it was saved with ep_size={saved_ep}, and "
            "DeepSpeed's optimizer partitions of expert weights depend on it. Resume with "
            f"model.moe.ep_size={saved_ep}, or start a new run.dir from its exported weights"
        )
    if meta.get("tokenizer_sha256") != tokenizer_sha256:
        raise ValueError(
            f"cannot resume from {where}: it was trained with tokenizer sha256 {meta.get('tokenizer_sha256')}, "
            f"but tokenizer.path now has {tokenizer_sha256}. Use the original tokenizer, or a new run.dir"
        )


def rng_state() -> dict:
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy_keys": torch.from_numpy(np_state[1].astype(np.int64)),
        "numpy_pos": int(np_state[2]),
        "python": list(random.getstate()[1]),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(("MT19937", state["numpy_keys"].numpy().astype(np.uint32), state["numpy_pos"], 0, 0.0))
    random.setstate((3, tuple(state["python"]), None))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


class _FileOps:
    """Counts this rank's file operations over the saves of this launch; `kill_at=N` kills the job just before the
    N-th (a test hook: walking N over 1, 2, ... crashes at every point of the first saves in turn)."""

    done = 0

    def __init__(self, kill_at: int | None) -> None:
        self.kill_at = kill_at

    def __call__(self, what: str) -> None:
        _FileOps.done += 1
        if self.kill_at is not None and _FileOps.done == self.kill_at:
            print(f"[debug] kill -9 before file operation {self.kill_at} of this launch's saves ({what})",
                  file=sys.stderr, flush=True)  # fmt: skip
            kill_job()


def kill_job() -> None:
    """SIGKILL this process and, under torchrun, the agent and every other local rank (a node losing power)."""
    if "TORCHELASTIC_RUN_ID" in os.environ:
        agent, me = os.getppid(), os.getpid()
        siblings = []
        for stat in Path("/proc").glob("[0-9]*/stat"):
            with contextlib.suppress(OSError, ValueError, IndexError):
                fields = stat.read_text().rsplit(")", 1)[1].split()
                if int(fields[1]) == agent and int(stat.parent.name) != me:
                    siblings.append(int(stat.parent.name))
        for pid in [agent, *siblings]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
    os.kill(os.getpid(), signal.SIGKILL)


def _remove(tag_dir: Path) -> None:
    """Delete a checkpoint, its manifest first, so that a crash midway leaves a directory resume ignores."""
    (tag_dir / CKPT_MANIFEST).unlink(missing_ok=True)
    shutil.rmtree(tag_dir, ignore_errors=True)


def retention_victims(ckpt_dir: Path, step: int, keep_last: int, keep_every: int) -> list[str]:
    """Tags to delete once `step` is saved: all up to `step` except the last `keep_last` (0 keeps all), every
    `keep_every`-th step and the one `latest` names. Tags past `step` (an abandoned history) are left alone: resume
    never picks them, and a save of the same step replaces them."""
    if keep_last <= 0:
        return []
    past = [t for t in _tags(ckpt_dir) if step_of(t) <= step]
    keep = set(past[-keep_last:])
    if keep_every > 0:
        keep |= {t for t in past if step_of(t) % keep_every == 0}
    keep.add(pointer_tag(ckpt_dir) or "")
    return [t for t in past if t not in keep]


def save(
    engine,
    ckpt_dir: Path,
    step: int,
    client_state: dict,
    meta: dict,
    full_weights: dict | None,
    keep_last: int = 0,
    keep_every: int = 0,
    kill_at: int | None = None,
) -> None:
    """Collective, crash-safe save (see the module docstring), then retention. `kill_at`: debug.kill_during_save_at."""
    from safetensors.torch import save_file

    tag = tag_for(step)
    final, tmp = ckpt_dir / tag, ckpt_dir / (TMP_PREFIX + tag)
    rank, world = dist.get_rank(), dist.get_world_size()
    ops = _FileOps(kill_at if rank == 0 else None)
    written: list[Path] = []  # this rank's files, which it fsyncs itself (on NFS only the writer's fsync counts)
    if rank == 0:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        for stale in ckpt_dir.glob(TMP_PREFIX + "*"):  # saves that a crash interrupted
            ops(f"remove {stale.name}")
            shutil.rmtree(stale, ignore_errors=True)
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
    ds_save = engine.checkpoint_engine.save

    def counted_save(state_dict, path):
        ops(Path(path).name)
        ds_save(state_dict, path)
        written.append(Path(path))

    engine.checkpoint_engine.save = counted_save
    try:
        engine.save_checkpoint(str(ckpt_dir), tag=tmp.name, client_state=client_state, save_latest=False)
    finally:
        engine.checkpoint_engine.save = ds_save
    dist.barrier()
    # Every rank fsyncs and hashes the files it wrote (in parallel; no rank lists a directory others write into).
    shares: list = [None] * world
    dist.all_gather_object(shares, {str(p.relative_to(tmp)): _sha256(p, sync=True) for p in written})
    if rank == 0:
        files = {name: info for share in shares for name, info in share.items()}
        ops(CKPT_MANIFEST)
        _write_synced(tmp / CKPT_MANIFEST, json.dumps({"tag": tag, "step": step, "files": files}, indent=2))
        _fsync_dir(tmp)
        if final.exists():  # left by an abandoned history (this run resumed from an older checkpoint)
            ops(f"replace {tag}")
            _remove(final)
        ops(f"rename to {tag}")
        os.rename(tmp, final)
        _fsync_dir(ckpt_dir)
        ops("latest.tmp")
        _write_synced(ckpt_dir / "latest.tmp", tag)
        ops("rename to latest")
        os.replace(ckpt_dir / "latest.tmp", ckpt_dir / "latest")
        _fsync_dir(ckpt_dir)
        for old in retention_victims(ckpt_dir, step, keep_last, keep_every):
            ops(f"remove {old}")
            _remove(ckpt_dir / old)
    dist.barrier()


def _allow_deepspeed_globals() -> None:
    """DeepSpeed pickles a few plain-data classes of its own into optimizer states; weights_only loading may build
    these (and nothing else that is not a tensor or a plain Python value)."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    torch.serialization.add_safe_globals([LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address])


@contextlib.contextmanager
def safe_loading(where: Path):
    """Every torch.load inside, DeepSpeed's own included, runs with weights_only=True: a checkpoint file that needs
    code to unpickle is refused (an error naming `where`), never executed."""
    _allow_deepspeed_globals()
    old = os.environ.get(FORCE_WEIGHTS_ONLY)
    os.environ[FORCE_WEIGHTS_ONLY] = "1"
    try:
        yield
    except pickle.UnpicklingError as err:
        detail = str(err).split("WeightsUnpickler error:")[-1].strip().splitlines()[0]
        raise ValueError(
            f"refused to load checkpoint {where}: one of its files needs arbitrary code to unpickle ({detail}). "
            "Checkpoints written by this framework never do, so the file was replaced or comes from elsewhere: "
            "resume from a checkpoint you trust, or start a new run.dir"
        ) from None
    finally:
        if old is None:
            os.environ.pop(FORCE_WEIGHTS_ONLY, None)
        else:
            os.environ[FORCE_WEIGHTS_ONLY] = old


def _add_zero3_optimizer_state(zero_dir: Path) -> None:
    """ZeRO-3 reads the optimizer step and hyperparameters from `optimizer_state_dict` in zero/optimizer_state.pt,
    which a conversion from ZeRO-1/2 does not write; add it (the step is the same for every parameter)."""
    state_file = zero_dir / "optimizer_state.pt"
    state = torch.load(state_file, weights_only=True)
    if "optimizer_state_dict" in state:
        return
    step = torch.load(next(zero_dir.glob("*/step.pt")), weights_only=True)
    state["optimizer_state_dict"] = {"state": {0: {"step": step}}, "param_groups": state["param_groups"]}
    torch.save(state, state_file)


def _fix_zero3_universal_load(engine, zero_dir: Path) -> None:
    """Undo two shortcuts of ZeRO-3's universal loader: it gives every parameter group the first group's
    hyperparameters (ours differ: no weight decay on norms and biases), and one shared `step` tensor to every
    parameter, which AdamW then increments once per group and step (wrong bias correction)."""
    saved = torch.load(zero_dir / "optimizer_state.pt", weights_only=True)["param_groups"]
    base = engine.optimizer.optimizer
    if len(saved) != len(base.param_groups):
        raise ValueError(f"{zero_dir}: {len(saved)} optimizer parameter groups saved, {len(base.param_groups)} now")
    for group, kept in zip(base.param_groups, saved, strict=True):
        group.update({k: v for k, v in kept.items() if k != "params"})
    for state in base.state.values():
        if torch.is_tensor(state.get("step")):
            state["step"] = state["step"].clone()


def ensure_universal(tag_dir: Path) -> None:
    """Convert `tag_dir` to DeepSpeed's universal format in `tag_dir/universal/` once (rank 0; collective)."""
    out = tag_dir / UNIVERSAL
    if dist.get_rank() == 0 and not out.is_dir():
        from deepspeed.checkpoint import ds_to_universal

        tmp = tag_dir / (TMP_PREFIX + UNIVERSAL)
        shutil.rmtree(tmp, ignore_errors=True)
        workers = max(1, min(8, (os.cpu_count() or 2) // 2))
        args = argparse.Namespace(
            input_folder=str(tag_dir),
            output_folder=str(tmp),
            num_extract_workers=workers,
            num_merge_workers=workers,
            keep_temp_folder=False,
            strict=True,
            inject_missing_state=True,
        )
        _warn(f"{tag_dir} was saved with another world size or ZeRO stage: converting it to {out} (once)")
        with safe_loading(tag_dir), contextlib.redirect_stdout(sys.stderr):
            ds_to_universal.main(args)
        # DeepSpeed looks for the model-state file under a ZeRO-3 name (zero_pp_rank_0_...) or another (mp_rank_...)
        # depending on the stage that reads it; holding both lets any stage resume from the same folder.
        for src in list(tmp.glob("*mp_rank_*_model_states.pt")):
            mp = src.name.split("mp_rank_", 1)[1]
            for name in (f"mp_rank_{mp}", f"zero_pp_rank_0_mp_rank_{mp}"):
                if not (tmp / name).exists():
                    shutil.copyfile(src, tmp / name)
        _add_zero3_optimizer_state(tmp / "zero")
        for path in tmp.rglob("*"):
            if path.is_file():
                _sha256(path, sync=True)
        (tag_dir / "latest_universal").unlink(missing_ok=True)  # DeepSpeed's pointer to the temporary name; unused
        os.rename(tmp, out)  # complete once it has its final name
        _fsync_dir(tag_dir)
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
    with safe_loading(tag_dir):
        path, client_state = engine.load_checkpoint(
            str(load_dir), tag=load_tag, load_optimizer_states=True, load_lr_scheduler_states=True
        )
        if path is None:
            raise FileNotFoundError(f"DeepSpeed could not load checkpoint {tag_dir}")
        if engine.load_universal_checkpoint() and engine.zero_optimization_partition_weights():
            _fix_zero3_universal_load(engine, tag_dir / UNIVERSAL / "zero")
        if any(getattr(p, "allreduce", True) is False for p in engine.module.parameters()):
            # DeepSpeed writes model states from rank 0 only: each rank takes its expert slice from the full weights.
            from train.expert_parallel import load_local_experts

            load_local_experts(engine.module, str(tag_dir / "model.safetensors"))
        # A rank that did not exist at save time (more ranks now) keeps its seeded RNG; training draws none on CPU.
        rng_file = tag_dir / f"rng_rank{dist.get_rank()}.pt"
        if rng_file.is_file():
            set_rng_state(torch.load(rng_file, weights_only=True))
    return client_state


def load_full_weights(run_dir: Path, tag: str | None = None) -> tuple[dict[str, torch.Tensor], dict]:
    """Full weights and meta of a run's checkpoint (latest by default), without DeepSpeed or pickle."""
    from safetensors.torch import load_file

    ckpt_dir = Path(run_dir) / "checkpoints"
    if tag is None:
        tag = latest_tag(ckpt_dir)
        if tag is None:
            raise FileNotFoundError(f"no complete checkpoint under {ckpt_dir}: train first, or fix run.dir")
    elif (reason := verify(ckpt_dir / tag)) is not None:
        raise ValueError(f"checkpoint {ckpt_dir / tag} is incomplete or damaged: {reason}. Choose another tag")
    weights = ckpt_dir / tag / "model.safetensors"
    if not weights.is_file():
        raise FileNotFoundError(f"checkpoint {ckpt_dir / tag} has no model.safetensors")
    return load_file(str(weights)), read_meta(ckpt_dir, tag)


def model_meta(model: ModelConfig, tokenizer_sha256: str, **extra) -> dict:
    return {"model": asdict(model), "tokenizer_sha256": tokenizer_sha256, **extra}


def load_model(run_dir: str | Path, tag: str | None = None):
    """Our Transformer with a run's checkpoint weights (latest by default), in eval mode; returns (model, meta)."""
    from model.transformer import Transformer

    state, meta = load_full_weights(Path(run_dir), tag)
    cfg = ModelConfig.from_dict(meta["model"])
    model = Transformer(cfg)
    missing, unexpected = model.load_state_dict(state, strict=False)
    allowed_missing = {"lm_head.weight"} if cfg.tie_embeddings else set()
    if unexpected or set(missing) - allowed_missing:
        raise ValueError(f"checkpoint weights do not fit the model: missing {missing}, unexpected {unexpected}")
    return model.eval(), meta
