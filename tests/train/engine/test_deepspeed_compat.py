"""Canaries for train/engine/deepspeed_compat.py: each DeepSpeed (or torch) behaviour a workaround relies on is
checked here, so a release that changes one fails with the workaround's name instead of a wrong training run. The
behaviour as a whole is exercised by the slow multi-process tests (expert parallelism, resharded resume, kill -9)."""

from __future__ import annotations

import inspect
import pickle
import warnings

import deepspeed
import pytest
import torch
from packaging.specifiers import SpecifierSet
from packaging.version import Version
from torch import nn

from train.engine import deepspeed_compat as compat


class Planted:
    """A class a checkpoint must never make the loader build."""


def test_installed_deepspeed_is_in_the_tested_range():
    assert Version(deepspeed.__version__) in SpecifierSet(compat.TESTED_VERSIONS), (
        f"deepspeed {deepspeed.__version__} is outside {compat.TESTED_VERSIONS}: check every workaround in "
        "train/engine/deepspeed_compat.py against it, then widen TESTED_VERSIONS and setup.py"
    )


def test_setup_bounds_deepspeed_to_the_tested_range():
    from tests.helpers import REPO

    assert f'"deepspeed{compat.TESTED_VERSIONS}"' in (REPO / "setup.py").read_text()


def test_expert_groups_private_api_exists():
    from deepspeed.utils import groups

    params = list(inspect.signature(groups._create_expert_and_data_parallel).parameters)
    assert params[0] == "expert_parallel_size_", params  # create_expert_groups
    assert "pp_size" in params, params  # expert groups inside each pipeline stage
    for name in ("_get_expert_parallel_group_dict", "_get_expert_parallel_group", "_get_expert_data_parallel_group"):
        assert callable(getattr(groups, name)), name


def test_engine_detects_moe_by_its_moe_layer_class():
    from deepspeed.runtime import engine

    # expert_parallel_marker: the engine turns on its MoE paths only for a deepspeed.moe.layer.MoE child.
    assert "isinstance(module, MoE)" in inspect.getsource(engine.DeepSpeedEngine)
    assert "has_moe_layers = True" in inspect.getsource(engine.DeepSpeedEngine)


def test_zero3_reads_per_parameter_partition_groups():
    from deepspeed.runtime.zero import partition_parameters, stage3

    # place_zero3_expert_param
    assert "ds_zero_partition_process_group" in inspect.getsource(partition_parameters)
    assert '"autoep_expert"' in inspect.getsource(stage3)


def test_lr_scheduler_accepts_a_marked_step():
    """gate_optimizer_step: the scheduler (built first, as build_engine does) wraps the optimizer's step; the gate
    wraps that, and torch takes our marked step for its own wrapper (no "optimizer.step() has been overridden"
    warning, and the scheduler still sees the optimizer step)."""
    p = torch.nn.Parameter(torch.ones(2))
    opt = torch.optim.SGD([p], lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    calls = []
    inner = compat.gate_optimizer_step(opt, lambda *a, **k: calls.append(1) or inner(*a, **k))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        p.grad = torch.ones(2)
        opt.step()
        sched.step()
    assert calls == [1] and torch.equal(p.detach(), torch.full((2,), 0.9))


def test_checkpoint_files_go_through_the_checkpoint_engine():
    from deepspeed.runtime import engine
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    # count_checkpoint_writes wraps `engine.checkpoint_engine.save(state_dict, path)`.
    assert list(inspect.signature(TorchCheckpointEngine.save).parameters)[1:3] == ["state_dict", "path"]
    assert "self.checkpoint_engine.save(" in inspect.getsource(engine.DeepSpeedEngine._save_checkpoint)


def test_weights_only_loading_refuses_code_in_any_torch_load(tmp_path):
    """weights_only_loading: torch's environment override applies to loads that pass no weights_only (DeepSpeed's)."""
    path = tmp_path / "planted.pt"
    torch.save({"x": Planted()}, path)
    assert isinstance(torch.load(path, weights_only=False)["x"], Planted)  # outside: loads what it is given
    with pytest.raises(ValueError, match="refused to load checkpoint"):
        with compat.weights_only_loading(tmp_path):
            torch.load(path, weights_only=False)
    with compat.weights_only_loading(tmp_path):
        assert torch.equal(torch.load(_saved(tmp_path), weights_only=False)["t"], torch.ones(1))
    assert pickle.loads(pickle.dumps(1)) == 1


def _saved(tmp_path):
    path = tmp_path / "plain.pt"
    torch.save({"t": torch.ones(1)}, path)
    return path


def test_ds_to_universal_takes_the_namespace_we_build():
    from deepspeed.checkpoint import ds_to_universal

    # convert_to_universal builds the script's argparse namespace by hand.
    source = inspect.getsource(ds_to_universal.parse_arguments)
    for flag in ("--input_folder", "--output_folder", "--num_extract_workers", "--num_merge_workers",
                 "--keep_temp_folder", "--inject_missing_state"):  # fmt: skip
        assert flag in source, flag
    assert "dest='strict'" in source  # our namespace sets `strict` directly (the script's --no_strict clears it)
    assert list(inspect.signature(ds_to_universal.main).parameters) == ["args"]


def test_expert_ranks_follow_deepspeed_s_group_layouts():
    """expert_ranks repeats `_create_expert_and_data_parallel`'s layouts (the docstring examples of
    create_expert_groups): E + D without tensor parallelism, TP-strided with it."""
    from deepspeed.utils import groups

    # world 4, ep 2: expert-parallel [0, 1] [2, 3], expert-data-parallel [0, 2] [1, 3]
    assert compat.expert_ranks(4, 2) == [(0, 0), (1, 0), (0, 1), (1, 1)]
    # world 4, tp 2, ep 2: expert-parallel [0, 2] [1, 3], expert-data-parallel [0, 1] [2, 3]
    assert compat.expert_ranks(4, 2, 2) == [(0, 0), (0, 1), (1, 0), (1, 1)]
    # world 8, tp 2, ep 2: expert-parallel [0, 2] [4, 6] [1, 3] [5, 7], expert-data-parallel [0, 1, 4, 5] [2, 3, 6, 7]
    assert compat.expert_ranks(8, 2, 2) == [(0, 0), (0, 1), (1, 0), (1, 1), (0, 2), (0, 3), (1, 2), (1, 3)]
    source = inspect.getsource(groups._create_expert_and_data_parallel)
    for line in ("ranks = range(pp_stage_start + i, pp_stage_start + pp_stride, expert_parallel_size_)",
                 "ranks = range(i * expert_parallel_size_, (i + 1) * expert_parallel_size_)",
                 "ordered_stage_ranks.append(stage_ranks[tp_group_idx * effective_mp_size + dp_lane])",
                 "edp_groups_list = [[ep_groups_list[g][pos] for g in range(num_ep_groups)]"):  # fmt: skip
        assert line in source, line


def test_universal_conversion_and_load_of_expert_weights():
    """convert_to_universal(experts=...) swaps ds_to_universal's `merge_tp_slices` (looked up when the merge runs)
    and writes the expert keys that the universal loader slices by expert-parallel rank."""
    from deepspeed.checkpoint import ds_to_universal, universal_checkpoint

    assert "partial(merge_tp_slices, uc_info, zero_output_folder, temp_dir, tp_degree)" in inspect.getsource(
        ds_to_universal._merge_tp_slice_files
    )
    assert 'path = os.path.join(param_base_path, f"{state_name}.{dp_index_to_str(dp_index)}")' in inspect.getsource(
        ds_to_universal.dump_param_fragment
    )
    assert "param_base_path = os.path.join(dir, param_name, str(tp_index))" in inspect.getsource(
        ds_to_universal.dump_param_fragment
    )
    load = inspect.getsource(universal_checkpoint.load_hp_checkpoint_state)
    assert "full_hp_param = full_hp_param[ep_start:ep_end]" in load
    assert "ckpt_dict.get(EP_IS_EXPERT_PARAM, False)" in load


def test_zero3_universal_loader_shortcuts_are_still_there():
    """fix_zero3_universal_load and complete_universal_folder: ZeRO-3's universal loader reads the step from
    `optimizer_state_dict` (which a ZeRO-1/2 conversion does not write), shares that one step tensor between all
    parameters, and copies group 0's hyperparameters to every group. When a release changes any of these, this
    fails: re-check the fixes (they may have become unnecessary or wrong)."""
    from deepspeed.runtime.zero import stage3

    source = inspect.getsource(stage3.DeepSpeedZeroOptimizer_Stage3.load_hp_checkpoint_state_from_checkpoint_dir_stage3)
    assert "[OPTIMIZER_STATE_DICT]['state'][0]['step']" in source
    assert "['step'] = state_step" in source
    assert '[OPTIMIZER_STATE_DICT]["param_groups"][0].items()' in source


def test_autotp_can_run_before_initialize():
    """autotp_before_initialize repeats the engine's AutoTP pass (partition_config branch) on a meta model; the
    engine's own pass must then skip the layers marked `replaced`, and AutoTP must leave meta shards on meta."""
    from deepspeed.module_inject.auto_tp import AutoTP
    from deepspeed.module_inject.layers import TensorParallel_Layer
    from deepspeed.runtime import engine

    branch = inspect.getsource(engine.DeepSpeedEngine._apply_autotp_partitioning)
    for call in ("autotp.set_tensor_parallel_config(", "autotp.update_linear_policies()",
                 "autotp._replace_module(model)", "partition_config=partition_config"):  # fmt: skip
        assert call in branch, call
    ours = ("module", "all_reduce_linears", "prefix", "state_dict", "linear_layer_setting", "orig_layer_impl",
            "keep_module_on_host", "partition_config", "vocab_parallel_lm_head", "model_config", "tp_grain_size",
            "training_mode")  # fmt: skip
    assert set(ours) <= set(inspect.signature(AutoTP.__init__).parameters)
    assert 'if getattr(child, "replaced", False) == True:' in inspect.getsource(AutoTP._replace_with_config)
    assert "tensor.is_meta" in inspect.getsource(TensorParallel_Layer.move)


def test_autotp_parameters_describe_their_slice():
    """autotp_slice reads each AutoTP parameter's universal-checkpoint metadata."""
    from deepspeed.checkpoint.constants import DS_AUTOTP_UC_META
    from deepspeed.module_inject.layers import _build_param_uc_restore_meta

    meta = _build_param_uc_restore_meta(partition_type="row", partition_dim=1, partition_sizes=(3, 3))
    for key in ("partition_dim", "partition_sizes", "replicated", "sub_param_shape"):
        assert key in meta, key
    p = torch.nn.Parameter(torch.empty(4, 3))
    setattr(p, DS_AUTOTP_UC_META, meta)
    assert compat.autotp_slice(p, 1) == (1, 3, 6)


def test_autotp_layers_describe_their_slices():
    from deepspeed.module_inject import auto_tp
    from deepspeed.module_inject.layers import LinearAllreduce, LinearLayer

    # tensor_parallel_shards: the attributes it reads, and which dimension each layer splits.
    column, row = LinearLayer(nn.Linear(8, 6, bias=False)), LinearAllreduce(nn.Linear(8, 6, bias=False), None)
    for layer, split in ((column, 6), (row, 8)):
        assert tuple(layer._orig_weight_shape) == (6, 8) and tuple(layer._partition_sizes) == (split,)
        assert (layer.tp_index, layer.tp_world_size, layer.mp_group, layer.is_tp_parallel) == (0, 1, None, False)
    assert not issubclass(LinearAllreduce, LinearLayer) and not issubclass(LinearLayer, LinearAllreduce)
    assert compat.tensor_parallel_shards(nn.Sequential(column, row)) == {}  # no group: nothing is split
    # model.attention.Attention.q_per_kv: AutoTP rewrites a split module's `n_heads`, not its `n_kv_heads`.
    source = inspect.getsource(auto_tp.AutoTP.update_mp_params)
    assert '"n_heads"' in source and '"n_kv_heads"' not in source
