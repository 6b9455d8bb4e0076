"""Every place Hangang relies on DeepSpeed behaviour that is private, undocumented or buggy, in one module.

Checked on DeepSpeed 0.19.8 (setup.py bounds deepspeed to >=0.19.8,<0.20). Each workaround names the upstream
behaviour it depends on; tests/train/engine/test_deepspeed_compat.py fails loudly when a release changes it.

- create_expert_groups: private `deepspeed.utils.groups._create_expert_and_data_parallel` and its group dicts.
- expert_parallel_marker: the engine runs its MoE code paths only when the model holds a `deepspeed.moe.layer.MoE`.
- place_zero3_expert_param: ZeRO-3 reads a per-parameter `ds_zero_partition_process_group` (its AutoEP placement).
- gate_optimizer_step: torch LR schedulers wrap `optimizer.step` once and mark it `_wrapped_by_lr_sched`.
- count_checkpoint_writes: every file of `save_checkpoint` goes through `engine.checkpoint_engine.save`.
- model_states_from_every_tensor_parallel_rank: the MoE save picks its writers with
  `checkpoint_engine.is_data_parallel_writer` of the expert-data-parallel rank.
- weights_only_loading: DeepSpeed calls `torch.load` without `weights_only`; torch honours an environment override.
- convert_to_universal: `deepspeed.checkpoint.ds_to_universal` is a script; its `main` takes an argparse namespace;
  expert weights are merged by our function in place of its `merge_tp_slices`, from its fragment files
  (NAME/TP_RANK/STATE.DP_RANK), with the `is_expert_param` / `ep_num_experts` keys its universal loader slices by.
- expert_ranks: the rank layouts of `_create_expert_and_data_parallel` (E + D, and TP-strided).
- complete_universal_folder: `ds_to_universal` writes the model-state file under one name and no ZeRO-3 optimizer
  state.
- fix_zero3_universal_load: ZeRO-3's universal load gives every group group 0's hyperparameters and one shared step.
- zero_flat_layouts: where each parameter's elements sit in ZeRO's flat fp32 partitions (stage 1/2
  `round_robin_bit16_groups` / `round_robin_bit16_offsets` / `partition_size` / `real_dp_process_group` /
  `single_partition_of_fp32_groups`; stage 3 `fp16_groups` / `sub_group_process_groups` /
  `fp32_partitioned_groups_flat`, `ds_tensor`, `partition_numel()`), read by Muon and QK-clip.
- autotp_before_initialize: the engine's AutoTP pass (`_apply_autotp_partitioning`, partition_config branch) run
  early on a meta model; AutoTP skips a layer marked `replaced`; `TensorParallel_Layer.move` keeps meta tensors.
- autotp_slice: each AutoTP parameter's `DS_AUTOTP_UC_META` attribute (universal-checkpoint metadata: partition_dim,
  partition_sizes, replicated) says which slice of the whole tensor a rank holds.
- tensor_parallel_shards: which slice of which matrix an AutoTP weight holds (`LinearLayer` / `LinearAllreduce`
  `_orig_weight_shape`, `_partition_sizes`, `tp_index`, `tp_world_size`, `mp_group`), read by Muon.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import os
import pickle
import re
import shutil
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

TESTED_VERSIONS = ">=0.19.8,<0.20"
"""The DeepSpeed versions these workarounds were checked on (also setup.py's install_requires bound)."""

FORCE_WEIGHTS_ONLY = "TORCH_FORCE_WEIGHTS_ONLY_LOAD"


# --- tensor parallelism (AutoTP) ---------------------------------------------------------------------------------


def autotp_before_initialize(model: nn.Module, tp_section: dict) -> None:
    """Shard `model` with AutoTP now, exactly as deepspeed.initialize would with the DeepSpeed config section
    `tensor_parallel` = tp_section (the tensor-parallel groups must exist). On a meta model the shards stay meta,
    with their local shapes, so a caller can allocate and fill just them (init.from_hf).

    deepspeed.initialize still runs its own AutoTP pass and its finalisation (vocabulary-parallel loss, replicated
    gradient hooks, universal-checkpoint metadata): every layer replaced here is marked `replaced`, the flag AutoTP
    checks before replacing a layer, so that pass finds nothing left to shard."""
    from deepspeed.module_inject.auto_tp import AutoTP
    from deepspeed.module_inject.layers import TensorParallel_Layer, set_autotp_mode
    from deepspeed.runtime.tensor_parallel.config import get_tensor_parallel_config
    from deepspeed.utils import groups

    tp = get_tensor_parallel_config({"tensor_parallel": tp_section})
    set_autotp_mode(training=True)  # deepspeed.initialize sets it too; layers built before would be inference ones
    # The arguments of DeepSpeedEngine._apply_autotp_partitioning's partition_config branch (0.19.8).
    autotp = AutoTP(module=model, all_reduce_linears=(), prefix="", state_dict=None,
                    linear_layer_setting=(nn.Linear, nn.Embedding), orig_layer_impl=None,
                    keep_module_on_host=tp.keep_module_on_host, partition_config=tp.get_partition_config_object(),
                    vocab_parallel_lm_head=tp.vocab_parallel_lm_head is True,
                    model_config=getattr(model, "config", None), tp_grain_size=tp.tensor_parallel.tp_grain_size,
                    training_mode=True)  # fmt: skip
    autotp.set_tensor_parallel_config(tp.autotp_size, groups.get_tensor_model_parallel_group())
    autotp.update_linear_policies()
    autotp._replace_module(model)
    for module in model.modules():
        if isinstance(module, TensorParallel_Layer):
            module.replaced = True


def autotp_slice(p: nn.Parameter, tp_rank: int) -> tuple[int, int, int] | None:
    """(dim, start, stop): the slice of the whole tensor that AutoTP parameter `p` holds on tensor-parallel rank
    `tp_rank`; None when it is whole (replicated, or never sharded)."""
    from deepspeed.checkpoint.constants import DS_AUTOTP_UC_META

    meta = getattr(p, DS_AUTOTP_UC_META, None)
    if meta is None or meta["replicated"] or meta["partition_dim"] is None:
        return None
    if meta["sub_param_shape"] is not None:
        raise NotImplementedError(f"AutoTP sub-parameter layout {meta['sub_param_shape']}: not a contiguous slice")
    sizes, dim = meta["partition_sizes"], meta["partition_dim"]
    start = sum(sizes[:tp_rank])
    if p.shape[dim] != sizes[tp_rank]:
        raise RuntimeError(f"AutoTP shard of shape {tuple(p.shape)} does not match its partition sizes {sizes}")
    return dim, start, start + sizes[tp_rank]


# --- expert parallelism -----------------------------------------------------------------------------------------


def expert_group_name(ep_size: int) -> str:
    """DeepSpeed's name of the expert groups of this degree (`deepspeed.moe.layer.MoE.expert_group_name`)."""
    return f"ep_size_{ep_size}"


def create_expert_groups(ep_size: int, pp_size: int = 1, tp_size: int = 1):
    """Create (once) DeepSpeed's expert-parallel and expert-data-parallel groups of `ep_size`; returns the
    expert-parallel group of this rank. DeepSpeed creates them only inside its own MoE layer's constructor
    (`set_deepspeed_parallelism`); ours are not DeepSpeed MoE layers, so we call the private function it calls.
    `pp_size` > 1: the groups are built inside each pipeline stage (its `pp_size` argument: stage-major ranks, world /
    pp_size per stage), before the pipeline's own groups exist. `tp_size` > 1: its "TP-strided native MoE topology"
    (`mp_size`, `mp_mode="tp"`): expert-parallel groups over the ranks of one tensor-parallel rank (world 4, tp 2, ep 2:
    [0, 2], [1, 3]), expert-data-parallel groups over the rest ([0, 1], [2, 3])."""
    from deepspeed.utils import groups

    name = expert_group_name(ep_size)
    if name not in groups._get_expert_parallel_group_dict():
        mp = {"mp_size": tp_size, "mp_mode": "tp"} if tp_size > 1 else {}
        groups._create_expert_and_data_parallel(ep_size, pp_size=pp_size, **mp)
    return groups._get_expert_parallel_group(name)


def expert_parallel_group(name: str):
    from deepspeed.utils import groups

    return groups._get_expert_parallel_group(name)


def expert_data_parallel_group(name: str):
    from deepspeed.utils import groups

    return groups._get_expert_data_parallel_group(name)


def expert_parallel_marker(ep_size: int, n_experts: int) -> nn.Module:
    """A parameterless child that makes DeepSpeed's engine run its MoE code paths (`has_moe_layers`).

    The engine turns on expert-aware gradient reduction, ZeRO 1/2 partitioning and broadcasting only when the
    model contains a `deepspeed.moe.layer.MoE`. The real experts live in our `Experts` modules, outside this
    marker; `num_local_experts = 0` keeps DeepSpeed from writing or reading per-expert checkpoint files of its
    own (our expert weights go through the model-states and ZeRO files, and model.safetensors).
    """
    from deepspeed.moe.layer import MoE as DeepSpeedMoE

    class ExpertParallelMarker(DeepSpeedMoE):
        def __init__(self) -> None:
            nn.Module.__init__(self)  # not DeepSpeedMoE.__init__: no gate, no experts of its own
            self.ep_size, self.num_experts, self.num_local_experts = ep_size, n_experts, 0
            self.expert_group_name = expert_group_name(ep_size)
            self.enable_expert_tensor_parallelism = False

        def set_deepspeed_parallelism(self, use_data_before_expert_parallel_: bool = False) -> None:
            pass  # create_expert_groups made the groups before the model was built

        def forward(self, *args, **kwargs):
            raise RuntimeError("ExpertParallelMarker only marks the model for DeepSpeed; it is never called")

    return ExpertParallelMarker()


def place_zero3_expert_param(p: nn.Parameter, name: str) -> None:
    """ZeRO-3 partitions a parameter over `ds_zero_partition_process_group` when it has one, and averages the
    gradients of the "autoep_expert" family over all data-parallel ranks while reducing them only within that group:
    the placement DeepSpeed gives its own AutoEP experts."""
    p.ds_zero_partition_process_group = expert_data_parallel_group(name)
    p.ds_zero_placement_family = "autoep_expert"
    p.ds_zero_partition_group_name = name


# --- optimizer step ---------------------------------------------------------------------------------------------


def gate_optimizer_step(optimizer: torch.optim.Optimizer, step: Callable) -> Callable:
    """Replace the base optimizer's `step` (an instance attribute, which DeepSpeed calls as `self.optimizer.step()`)
    with `step`; returns the original. torch's LR schedulers wrap `optimizer.step` once and mark the wrapper
    `_wrapped_by_lr_sched`; marking ours keeps them from wrapping (and warning about) it again."""
    inner = optimizer.step

    def gated(*args, **kwargs):
        return step(*args, **kwargs)

    gated._wrapped_by_lr_sched = True
    optimizer.step = gated
    return inner


# --- flat ZeRO partitions ---------------------------------------------------------------------------------------


@dataclass
class Segment:
    """A run of one parameter's elements held by one rank: `length` elements from `param_start` (in the
    parameter's flattened order) at `offset` in that rank's flat partition."""

    rank: int
    offset: int
    param_start: int
    length: int


@dataclass
class FlatParam:
    """One (model) parameter inside a flat fp32 partition."""

    param: nn.Parameter
    shape: torch.Size
    segments: list[Segment]
    lp_local: bool
    """True (ZeRO-3): this rank's model copy is only its partition `param.ds_tensor` (flattened elements from
    rank * partition_numel); False (ZeRO-1/2): the whole parameter."""
    partition_numel: int = 0
    """ZeRO-3: elements of the parameter per rank (the last rank's padded)."""


@dataclass
class FlatLayout:
    """A flat fp32 master partition handed to the base optimizer as one `param`: which parameters it holds, over
    which process group (all ranks, or an expert-data-parallel group) the flat buffer is partitioned."""

    flat: torch.Tensor
    group: object
    world: int
    rank: int
    partition_numel: int
    params: list[FlatParam] = field(default_factory=list)


def zero_flat_layouts(ds_engine) -> list[FlatLayout]:
    """The flat fp32 partitions of a ZeRO 1-3 engine and where every parameter's elements are in them (stage 1/2:
    one per parameter group, parameters laid end to end, the flat buffer cut into equal rank partitions; stage 3:
    one per sub-group, each parameter cut into equal rank partitions, the flat holding this rank's pieces)."""
    import torch.distributed as dist

    opt = ds_engine.optimizer
    stage = ds_engine.zero_optimization_stage()
    layouts = []
    if stage in (1, 2):
        for i, params in enumerate(opt.round_robin_bit16_groups):
            group = opt.real_dp_process_group[i]
            world, rank, ps = dist.get_world_size(group), dist.get_rank(group), int(opt.partition_size[i])
            layout = FlatLayout(opt.single_partition_of_fp32_groups[i], group, world, rank, ps)
            for p, offset in zip(params, opt.round_robin_bit16_offsets[i], strict=True):
                n = p.numel()
                segs = []
                for r in range(offset // ps, (offset + n - 1) // ps + 1):
                    lo, hi = max(offset, r * ps), min(offset + n, (r + 1) * ps)
                    segs.append(Segment(r, lo - r * ps, lo - offset, hi - lo))
                layout.params.append(FlatParam(p, p.shape, segs, lp_local=False))
            layouts.append(layout)
    elif stage == 3:
        for i, params in enumerate(opt.fp16_groups):
            group = opt.sub_group_process_groups[i]
            world, rank = dist.get_world_size(group), dist.get_rank(group)
            flat = opt.fp32_partitioned_groups_flat[i]
            layout = FlatLayout(flat, group, world, rank, flat.numel())
            offset = 0
            for p in params:
                pn, n = p.partition_numel(), p.ds_numel
                segs = [Segment(r, offset, r * pn, min(pn, n - r * pn)) for r in range(world) if n - r * pn > 0]
                layout.params.append(FlatParam(p, p.ds_shape, segs, lp_local=True, partition_numel=pn))
                offset += pn
            layouts.append(layout)
    return layouts


# --- tensor-parallel shards -----------------------------------------------------------------------------------


@dataclass
class TPShard:
    """A 2-D weight that is one rank's slice of a matrix under AutoTP: the `index`-th of `world` equal slices of
    the `full` matrix along `dim` (0: column-parallel, output rows; 1: row-parallel, input columns), over `group`."""

    group: object
    world: int
    index: int
    dim: int
    full: torch.Size

    @property
    def local(self) -> torch.Size:
        """The shape of this rank's slice."""
        shape = list(self.full)
        shape[self.dim] //= self.world
        return torch.Size(shape)


def tensor_parallel_shards(model: nn.Module) -> dict[int, TPShard]:
    """id(weight) -> its slice, for every weight AutoTP split (after deepspeed.initialize); replicated weights are
    absent. AutoTP keeps the module's Parameter object and replaces its data with the slice."""
    from deepspeed.module_inject.layers import LinearAllreduce, LinearLayer

    out = {}
    for name, module in model.named_modules():
        if not isinstance(module, (LinearLayer, LinearAllreduce)) or not module.is_tp_parallel:
            continue
        dim = 1 if isinstance(module, LinearAllreduce) else 0
        sizes = tuple(module._partition_sizes)
        if len(set(sizes)) != 1:
            raise RuntimeError(f"AutoTP split {name}.weight unevenly {sizes}: expected equal slices")
        full = torch.Size(module._orig_weight_shape)
        out[id(module.weight)] = TPShard(module.mp_group, module.tp_world_size, module.tp_index, dim, full)
    return out


# --- checkpoint files -------------------------------------------------------------------------------------------


@contextlib.contextmanager
def count_checkpoint_writes(engine, before_write: Callable[[Path], None]) -> Iterator[list[Path]]:
    """Within the block, call `before_write(path)` before each file DeepSpeed's `save_checkpoint` writes, and
    collect the paths (yielded list). DeepSpeed writes every checkpoint file through `engine.checkpoint_engine.save`
    (TorchCheckpointEngine) and has no hook for it."""
    written: list[Path] = []
    ds_save = engine.checkpoint_engine.save

    def counted_save(state_dict, path):
        before_write(Path(path))
        ds_save(state_dict, path)
        written.append(Path(path))

    engine.checkpoint_engine.save = counted_save
    try:
        yield written
    finally:
        engine.checkpoint_engine.save = ds_save


@contextlib.contextmanager
def model_states_from_every_tensor_parallel_rank(engine) -> Iterator[None]:
    """Within the block (a `save_checkpoint`), let the first data-parallel rank of every tensor-parallel rank write
    its model-states file (`mp_rank_NN_model_states.pt`) when the model has expert-parallel layers.

    DeepSpeed's MoE save (`_save_moe_checkpoint`) returns before writing the model states on every rank that is not
    the first of its expert-data-parallel group (`checkpoint_engine.is_data_parallel_writer(exp_dp_rank)`). With
    tensor parallelism that group holds the tensor-parallel peers, so only tensor-parallel rank 0 would write, and the
    load fails ("checkpoint count 1 is different from saved mp_world_size 2"). Past that return the writer is chosen
    by the data-parallel rank alone (and our expert weights never go to DeepSpeed's per-expert files, see
    `expert_parallel_marker`), so answering True there changes nothing else."""
    ce = engine.checkpoint_engine
    if not (getattr(engine, "has_moe_layers", False) and engine.autotp_size() > 1):
        yield
        return
    ce.is_data_parallel_writer = lambda dp_rank: True  # an instance attribute over the class's method
    try:
        yield
    finally:
        del ce.is_data_parallel_writer


def _allow_deepspeed_globals() -> None:
    """DeepSpeed pickles a few plain-data classes of its own into optimizer states; weights_only loading may build
    these (and nothing else that is not a tensor or a plain Python value)."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    torch.serialization.add_safe_globals([LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address])


@contextlib.contextmanager
def weights_only_loading(where: Path):
    """Every torch.load inside, DeepSpeed's own included, runs with weights_only=True: a checkpoint file that needs
    code to unpickle is refused (an error naming `where`), never executed. DeepSpeed's loaders take no
    `weights_only` argument, so this sets torch's process-wide override for the duration of the block."""
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


# --- universal checkpoints --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ExpertShards:
    """How a ZeRO-1/2 checkpoint's routed-expert weights were split: `names` (each a stacked (n_experts, ...)
    parameter), over `ep_size` expert-parallel ranks, each rank's share partitioned by ZeRO over its
    expert-data-parallel group, in a job of `world` ranks and `tp_size`-way tensor parallelism."""

    names: frozenset[str]
    n_experts: int
    world: int
    ep_size: int
    tp_size: int = 1


def expert_ranks(world: int, ep_size: int, tp_size: int = 1) -> list[tuple[int, int]]:
    """(expert-parallel rank, expert-data-parallel rank) of every global rank, as `create_expert_groups` makes the
    groups (DeepSpeed's `_create_expert_and_data_parallel`, one pipeline stage: its E + D layout without tensor
    parallelism, its TP-strided one with it). A rank's place in a group is its place in the sorted ranks (torch's
    `new_group` sorts them)."""
    if tp_size == 1:
        return [(r % ep_size, r // ep_size) for r in range(world)]
    ordered = [g * tp_size + lane for lane in range(tp_size) for g in range(world // tp_size)]
    ep_groups = [ordered[i : i + ep_size] for i in range(0, world, ep_size)]
    edp_groups = [[group[pos] for group in ep_groups] for pos in range(ep_size)]
    where = {}
    for kind, groups in enumerate((ep_groups, edp_groups)):
        for group in groups:
            for r in group:
                where[(kind, r)] = sorted(group).index(r)
    return [(where[(0, r)], where[(1, r)]) for r in range(world)]


def _merge_expert_slices(experts: ExpertShards, merge_tp_slices: Callable, uc_info, dir, slice_dir, tp_degree,
                         name_and_shapes):  # fmt: skip
    """`ds_to_universal.merge_tp_slices` for a routed-expert parameter: its whole (n_experts, ...) tensor from every
    rank's fragment, written with DeepSpeed's expert-parameter keys so that a universal load takes each
    expert-parallel rank's experts out of it (`load_hp_checkpoint_state`). DeepSpeed's own merge concatenates a
    parameter's fragments in data-parallel order per tensor-parallel rank, which for expert weights mixes the
    experts of different expert-parallel ranks (their ZeRO partitions follow the expert-data-parallel group)."""
    from deepspeed.checkpoint import constants as c
    from deepspeed.checkpoint.ds_to_universal import SubparamShape

    name, per_tp_shapes = name_and_shapes
    if name not in experts.names:
        return merge_tp_slices(uc_info, dir, slice_dir, tp_degree, name_and_shapes)
    ranks = expert_ranks(experts.world, experts.ep_size, experts.tp_size)
    edp_size = experts.world // experts.ep_size
    base = Path(slice_dir) / name
    step = None
    for state in ("fp32", "exp_avg", "exp_avg_sq", "step"):
        parts = {}
        for r, where in enumerate(ranks):
            # ds_to_universal's fragment files: NAME/TP_RANK/STATE.DP_RANK (tensor-parallel groups are consecutive).
            path = base / str(r % experts.tp_size) / f"{state}.{r // experts.tp_size:02d}"
            if path.is_file():
                parts[where] = torch.load(path, weights_only=True)
        if state == "step":
            step = next(iter(parts.values()), None)
            continue
        local = [
            torch.cat([parts[(e, k)] for k in range(edp_size) if (e, k) in parts]).view(per_tp_shapes[0])
            for e in range(experts.ep_size)
        ]
        full = torch.cat(local)
        if full.shape[0] != experts.n_experts:
            raise ValueError(f"{name}: {full.shape[0]} experts assembled from the checkpoint, expected "
                             f"{experts.n_experts}")  # fmt: skip
        record = {c.PARAM: full, c.CAT_DIM: 0, c.EP_IS_EXPERT_PARAM: True, c.EP_NUM_EXPERTS: experts.n_experts}
        (Path(dir) / name).mkdir(parents=True, exist_ok=True)
        torch.save(record, Path(dir) / name / f"{state}.pt")
    if step is not None:
        torch.save(step, Path(dir) / name / "step.pt")
    keys = (c.TP_REPLICATED_PARAMETER_PATTERNS, c.PARAMETER_TO_AVERAGE_PATTERNS,
            c.PARAMETER_WITH_ROW_PARALLELISM_PATTERNS, c.VOCABULARY_PARAMETER_PATTERNS,
            c.PARAMETER_WITH_2_SUB_PARAMS_CAT_DIM_0)  # fmt: skip
    patterns = {p for key in keys for p in uc_info.get(key, [])}
    patterns.update(p for s in uc_info.get(c.PARAMETER_WITH_SUB_PARAMS, []) for p in SubparamShape(**s).patterns)
    return {p for p in patterns if not re.match(p, name)}  # the patterns this parameter used, as DeepSpeed's merge


def convert_to_universal(folder: Path, out: Path, workers: int, experts: ExpertShards | None = None) -> None:
    """DeepSpeed's `ds_to_universal` on one checkpoint folder. It is a script with no library entry point: its
    `main` takes the script's argparse namespace (these fields as of 0.19) and prints progress (sent to stderr).

    `experts` (a ZeRO-1/2 checkpoint of an expert-parallel run): their parameters are merged by
    `_merge_expert_slices`, put in place of the module's `merge_tp_slices` (which `_merge_tp_slice_files` looks up
    when it runs) for the conversion, in this process (one worker: a worker process might not see the swap).
    Without it DeepSpeed's merge takes a parameter's fragments per tensor-parallel rank in data-parallel order, while
    an expert weight's fragments follow its expert-data-parallel group, so it joins pieces of other ranks' experts;
    on a tp 2 x dp 2 x ep 2 ZeRO-1 checkpoint it stops with "No fragment files for tp rank 0 of a parameter whose
    recorded shape (4, 192, 128) is not empty" (`_merge_zero_shards`, ds_to_universal.py:290 in 0.19.8)."""
    from deepspeed.checkpoint import ds_to_universal

    if experts is not None:
        workers = 1
    args = argparse.Namespace(input_folder=str(folder), output_folder=str(out), num_extract_workers=workers,
                              num_merge_workers=workers, keep_temp_folder=False, strict=True,
                              inject_missing_state=True)  # fmt: skip
    original = ds_to_universal.merge_tp_slices
    if experts is not None:
        ds_to_universal.merge_tp_slices = functools.partial(_merge_expert_slices, experts, original)
    try:
        with contextlib.redirect_stdout(sys.stderr):
            ds_to_universal.main(args)
    finally:
        ds_to_universal.merge_tp_slices = original


def complete_universal_folder(folder: Path) -> None:
    """Make a fresh `ds_to_universal` output loadable by every ZeRO stage.

    DeepSpeed looks for the model-state file under a ZeRO-3 name (zero_pp_rank_0_...) or another (mp_rank_...)
    depending on the stage that reads it: hold both. ZeRO-3 reads the optimizer step and hyperparameters from
    `optimizer_state_dict` in zero/optimizer_state.pt, which a conversion from ZeRO-1/2 does not write: add it (the
    step is the same for every parameter)."""
    for src in list(folder.glob("*mp_rank_*_model_states.pt")):
        mp = src.name.split("mp_rank_", 1)[1]
        for name in (f"mp_rank_{mp}", f"zero_pp_rank_0_mp_rank_{mp}"):
            if not (folder / name).exists():
                shutil.copyfile(src, folder / name)
    zero_dir = folder / "zero"
    state_file = zero_dir / "optimizer_state.pt"
    state = torch.load(state_file, weights_only=True)
    if "optimizer_state_dict" in state:
        return
    step = torch.load(next(zero_dir.glob("*/step.pt")), weights_only=True)
    state["optimizer_state_dict"] = {"state": {0: {"step": step}}, "param_groups": state["param_groups"]}
    torch.save(state, state_file)


def fix_zero3_universal_load(engine, zero_dir: Path) -> None:
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
