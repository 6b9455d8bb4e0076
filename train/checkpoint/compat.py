"""Whether a checkpoint can be resumed by this run: same model (architecture), tokenizer and expert layout, and
whether its ZeRO partitions must be resharded through DeepSpeed's universal format."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

from model.config import ExecutionConfig, ModelConfig


def model_meta(model: ModelConfig, tokenizer_sha256: str, execution: ExecutionConfig | None = None, **extra) -> dict:
    """What a checkpoint's meta.json records about the model (`model` is the architecture alone)."""
    meta = {"model": asdict(model), "tokenizer_sha256": tokenizer_sha256, **extra}
    if execution is not None:
        meta["execution"] = asdict(execution)
    return meta


def check_compatible(meta: dict, model: ModelConfig, tokenizer_sha256: str, where: Path) -> None:
    """Refuse to resume a checkpoint of another model or tokenizer, naming each difference (`needs_universal`
    judges the layout, the expert-parallel degree included).

    Compatible means equal architecture (`ModelConfig` equality; its `name` is a label and not compared).
    Checkpoints written before a field existed hold its default; older ones also hold execution keys, ignored here.
    """
    saved = ModelConfig.from_dict(meta["model"])
    if saved != model:
        ours, theirs = _flat(asdict(model)), _flat(asdict(saved))
        diffs = [f"model.{k}: checkpoint {theirs.get(k)!r}, config {ours.get(k)!r}"
                 for k in sorted(ours) if k != "name" and ours.get(k) != theirs.get(k)]  # fmt: skip
        raise ValueError(
            f"cannot resume from {where}: it holds a model of another shape ({'; '.join(diffs)}). "
            "Use the model config it was trained with, or a new run.dir"
        )
    if meta.get("tokenizer_sha256") != tokenizer_sha256:
        raise ValueError(
            f"cannot resume from {where}: it was trained with tokenizer sha256 {meta.get('tokenizer_sha256')}, "
            f"but tokenizer.path now has {tokenizer_sha256}. Use the original tokenizer, or a new run.dir"
        )


def saved_ep_size(meta: dict) -> int:
    """The expert-parallel degree a checkpoint was saved with (older checkpoints kept it in model.moe)."""
    if "ep_size" in meta:
        return int(meta["ep_size"])
    moe = meta.get("model", {}).get("moe", {})
    return int(moe.get("ep_size", 1)) if moe.get("enabled", False) else 1


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def needs_universal(
    meta: dict, world_size: int, zero_stage: int, where: Path, tp_size: int = 1, pp_size: int = 1, ep_size: int = 1
) -> bool:
    """Whether resuming `meta`'s checkpoint with this world size, ZeRO stage and tensor-parallel degree needs
    DeepSpeed's universal format. (The sequence-parallel degree does not shard parameters, so it never does.)
    A pipeline-parallel checkpoint resumes on its own layout, or resharded (our own converter) on a layout without
    pipeline or tensor parallelism; a pipeline job resumes only its own layout's checkpoints. A tensor and expert
    parallel checkpoint is resharded between ZeRO-1/2 layouts only (train/checkpoint/universal.py merges its experts
    from the ZeRO-1/2 optimizer files)."""
    saved = (meta.get("world_size"), meta.get("zero_stage"))
    saved_tp = int(meta.get("tp_size", 1))
    saved_pp = int(meta.get("pp_size", 1))
    saved_ep = saved_ep_size(meta)
    if (saved_pp > 1 or pp_size > 1) and (saved_pp, *saved, saved_tp) != (pp_size, world_size, zero_stage, tp_size):
        if pp_size == 1 and tp_size == 1 and zero_stage > 0 and ep_size == saved_ep == 1:
            return True  # train/checkpoint/pipeline_universal.py
        raise ValueError(
            f"cannot resume {where} (parallel.pp_size={saved_pp}, {saved[0]} ranks, ZeRO-{saved[1]}) with "
            f"parallel.pp_size={pp_size}, tp_size={tp_size}, ep_size={ep_size} on {world_size} ranks, "
            f"ZeRO-{zero_stage}: "
            "a pipeline checkpoint is resharded only to a layout without pipeline, tensor or expert parallelism "
            "(ZeRO 1-3; DeepSpeed's own converter cannot read it, ours covers that case), and a pipeline job "
            f"resumes only its own layout's checkpoints. Resume with parallel.pp_size={saved_pp} on {saved[0]} "
            "ranks, or with pp_size=1, tp_size=1 and ep_size=1"
        )
    if saved_ep != ep_size:
        if saved_pp == pp_size == 1 and saved[1] in (1, 2) and zero_stage in (1, 2):
            return True  # the universal checkpoint holds every expert; each rank loads its own (universal.py)
        raise ValueError(
            f"cannot resume from {where} (ep_size={saved_ep}, ZeRO-{saved[1]}, parallel.pp_size={saved_pp}) with "
            f"model.moe.ep_size={ep_size}, ZeRO-{zero_stage}, pp_size={pp_size}: another expert-parallel degree is "
            "resharded from ZeRO-1/2 files to a ZeRO-1/2 job without pipeline parallelism only. Resume with "
            f"model.moe.ep_size={saved_ep}, or with deepspeed.zero_stage=1 or 2 from a ZeRO-1/2 checkpoint, or "
            "start a new run.dir from its exported weights"
        )
    if saved == (world_size, zero_stage) and saved_tp == tp_size:
        return False
    if saved_tp != tp_size and 0 in (saved[1], zero_stage):
        raise ValueError(
            f"cannot resume {where} (parallel.tp_size={saved_tp}) with parallel.tp_size={tp_size} under "
            f"deepspeed.zero_stage={zero_stage}: resharding tensor-parallel weights goes through DeepSpeed's "
            f"universal checkpoint, which needs ZeRO 1-3 on both sides. Resume with parallel.tp_size={saved_tp}"
        )
    if ep_size > 1 and (saved_tp > 1 or tp_size > 1) and 3 in (saved[1], zero_stage):
        raise ValueError(
            f"cannot resume {where} (parallel.tp_size={saved_tp}, {saved[0]} ranks, ZeRO-{saved[1]}) with "
            f"parallel.tp_size={tp_size} on {world_size} ranks, ZeRO-{zero_stage} and ep_size={ep_size}: a tensor "
            "and expert parallel checkpoint is resharded from ZeRO-1/2 files to a ZeRO-1/2 job only (the expert "
            "weights are merged from the ZeRO-1/2 optimizer files; ZeRO-3's are laid out otherwise). Resume with "
            f"parallel.tp_size={saved_tp} on {saved[0]} ranks and deepspeed.zero_stage={saved[1]}, or save and "
            "resume with deepspeed.zero_stage=1 or 2"
        )
    if saved[1] == 0 and zero_stage == 0:
        return False  # ZeRO-0 keeps whole optimizer states, which any number of ranks loads as they are
    if saved[1] == 0 or zero_stage == 0:
        raise ValueError(
            f"cannot resume {where} (ZeRO-{saved[1]}, {saved[0]} ranks) with deepspeed.zero_stage={zero_stage} on "
            f"{world_size} ranks: resharding goes through DeepSpeed's universal checkpoint, which needs ZeRO 1-3 on "
            f"both sides. Resume with deepspeed.zero_stage={saved[1]}"
        )
    return True
