"""Our own converter from a pipeline-parallel checkpoint (DeepSpeed `PipelineModule`, ZeRO-1) to DeepSpeed's universal
format, from which a job without pipeline parallelism (any world size, ZeRO 1-3) resumes.

Hand-written because DeepSpeed's `ds_to_universal` cannot read it: it assumes Megatron-DeepSpeed's pipeline layer
files (`layer_XX-model_YY-model_states.pt`, one per layer and tensor-parallel rank) and stops with a
ZeroDivisionError in `_build_transformer_file_map` on a PipelineModule checkpoint, whose layer files are
`layer_XX-model_states.pt` (and absent altogether for a model with MoE layers, whose stage weights DeepSpeed's MoE
save puts in the stage's model-states file).

What it reads, per stage S (DeepSpeed's mp_rank) and data-parallel rank D (its "pp_rank", a historic name):
`mp_rank_0S_model_states.pt` (`param_shapes`: each optimizer group's parameters, by PipelineModule name, in flat
order; the client state, LR schedule and step counters) and `zero_pp_rank_D_mp_rank_0S_optim_states.pt` (this
rank's slice of each group's flat fp32 master weights and Adam moments, and `param_slice_mappings`: where each
parameter's elements lie in it). A parameter's full tensor is its fragments concatenated in data-parallel order.
The tied embedding is held (and updated alike) by the first and the last stage: the first stage's copy is kept.

What it writes is what `ds_to_universal` writes for a checkpoint without pipeline parallelism: `zero/<name>/
{fp32,exp_avg,exp_avg_sq,step}.pt` under the `Transformer`'s parameter names, `zero/optimizer_state.pt` (the ZeRO
global state and the parameter groups' hyperparameters) and `mp_rank_00_model_states.pt` (the first stage's
file with the whole model's weights, shapes and one model-parallel rank). Expert parallelism is not covered (its
expert weights are split over expert-parallel ranks as well): `needs_universal` refuses that case.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from pathlib import Path

import torch

from model.config import ModelConfig
from model.transformer import Transformer
from train.engine.pipeline import model_param_name

STATES = ("fp32", "exp_avg", "exp_avg_sq")
SHARDED = ("base_optimizer_state", "param_slice_mappings", "single_partition_of_fp32_groups")
"""Per-rank entries of a ZeRO-1 optimizer file; the rest is the optimizer's global state (the same on every rank)."""


def _load(path: Path):
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: the pipeline checkpoint is incomplete")
    return torch.load(path, map_location="cpu", weights_only=True)


def _groups(osd: dict) -> list[str]:
    return [g.get("name", str(i)) for i, g in enumerate(osd["base_optimizer_state"]["param_groups"])]


def pipeline_to_universal(tag_dir: Path, out: Path) -> None:
    """Write the universal checkpoint of the pipeline checkpoint `tag_dir` to `out` (a new directory).

    Run inside `weights_only_loading` (DeepSpeed's optimizer files hold a few classes of its own)."""
    meta = json.loads((tag_dir / "meta.json").read_text())
    pp, world = int(meta["pp_size"]), int(meta["world_size"])
    dp = world // pp
    cfg = ModelConfig.from_dict(meta["model"])
    with torch.device("meta"):
        model = Transformer(cfg, random_init=False)
    names = {id(p): n for n, p in model.named_parameters()}  # the first name of a tied parameter
    states: dict[str, dict[str, torch.Tensor]] = {}
    steps: dict[str, torch.Tensor] = {}
    group_names: list[str] | None = None
    global_state: dict | None = None
    for stage in range(pp):
        shapes = _load(tag_dir / f"mp_rank_{stage:02d}_model_states.pt")["param_shapes"]
        parts = [
            _load(tag_dir / f"zero_pp_rank_{rank}_mp_rank_{stage:02d}_optim_states.pt")["optimizer_state_dict"]
            for rank in range(dp)
        ]
        if group_names is None:
            group_names, global_state = _groups(parts[0]), parts[0]
        elif _groups(parts[0]) != group_names:
            raise ValueError(f"{tag_dir}: optimizer groups {_groups(parts[0])} in stage {stage}, {group_names} in 0")
        for g, group_shapes in enumerate(shapes):
            pieces: dict[str, dict[str, list[torch.Tensor]]] = {n: {k: [] for k in STATES} for n in group_shapes}
            for part in parts:
                adam = part["base_optimizer_state"]["state"][g]
                flat = {"fp32": part["single_partition_of_fp32_groups"][g], **{k: adam[k] for k in STATES[1:]}}
                for name, frag in part["param_slice_mappings"][g].items():
                    for key in STATES:
                        pieces[name][key].append(flat[key].narrow(0, frag.start, frag.numel))
            step = parts[0]["base_optimizer_state"]["state"][g]["step"]
            for name, shape in group_shapes.items():
                target = model_param_name(name, cfg.n_layers)
                if target in states:
                    continue  # the last stage's copy of the tied embedding
                full = {}
                for key in STATES:
                    flat = torch.cat(pieces[name][key])
                    if flat.numel() != shape.numel():
                        raise ValueError(f"{tag_dir}: {name} has {flat.numel()} of {shape.numel()} elements of {key}")
                    full[key] = flat.view(shape).clone()
                states[target], steps[target] = full, step
    expected = set(names.values())
    if set(states) != expected:
        raise ValueError(
            f"{tag_dir}: the pipeline's optimizer states cover {sorted(set(states) ^ expected)} differently from "
            f"the model's parameters"
        )
    zero = out / "zero"
    for name, full in states.items():
        (zero / name).mkdir(parents=True)
        for key, tensor in full.items():
            torch.save({"param": tensor, "cat_dim": 0}, zero / name / f"{key}.pt")
        torch.save(steps[name], zero / name / "step.pt")
    model_states = _model_states(tag_dir, model, names)
    for name, tensor in model_states["module"].items():  # as ds_to_universal: tied names and buffers, fp32 only
        if not (zero / name).is_dir():
            (zero / name).mkdir(parents=True)
            torch.save({"param": tensor.float()}, zero / name / "fp32.pt")
    optimizer_state = {k: v for k, v in global_state.items() if k not in SHARDED}
    optimizer_state["param_groups"] = global_state["base_optimizer_state"]["param_groups"]
    torch.save(optimizer_state, zero / "optimizer_state.pt")
    torch.save(model_states, out / "mp_rank_00_model_states.pt")


def _model_states(tag_dir: Path, model: Transformer, names: dict[int, str]) -> dict:
    """The first stage's model-states file (client state, LR schedule, counters) made a single-stage one: the whole
    model's weights (from model.safetensors), its optimizer groups' shapes as `build_optimizer` forms them, its
    buffers and tied parameters."""
    from safetensors.torch import load_file

    state = _load(tag_dir / "mp_rank_00_model_states.pt")
    weights = load_file(str(tag_dir / "model.safetensors"))
    module = OrderedDict()
    for key, value in model.state_dict(keep_vars=True).items():
        module[key] = weights[names.get(id(value), key)]
    decay, no_decay = OrderedDict(), OrderedDict()
    for name, p in model.named_parameters():
        (decay if p.ndim >= 2 else no_decay)[name] = p.shape
    shared = {n: names[id(p)] for n, p in model.named_parameters(remove_duplicate=False) if names[id(p)] != n}
    state.update(
        module=module,
        param_shapes=[decay, no_decay],
        buffer_names=[n for n in module if n not in names.values() and n not in shared],
        shared_params=shared,
        mp_world_size=1,
        checkpoint_parallel_dimensions={"pp_degree": 1, "tp_degree": 1},
    )
    return state
