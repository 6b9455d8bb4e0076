"""The trainer's config: keys that left `model` and `train` still work under their old spelling, with one
deprecation line each, and land where they now live."""

from __future__ import annotations

from hydra import compose, initialize_config_dir

from data_pipeline.cli import to_object_strict
from model.config import ModelConfig
from tests.helpers import REPO
from train.config import MOVED_KEYS, PretrainConfig, move_deprecated_keys

OLD = {
    "model.attn_backend": "eager",
    "model.loss_impl": "chunked",
    "model.loss_chunk_size": 128,
    "model.kernels": "torch",
    "model.activation_checkpointing": "full",
    "model.moe.expert_impl": "loop",
    "model.moe.ep_size": 2,
    "model.moe.gamma": 0.01,
    "model.moe.gamma_until": 0.5,
    "model.moe.balance": "aux_loss",
    "model.moe.seq_aux_alpha": 0.001,
    "model.moe.aux_loss_alpha": 0.02,
    "model.mtp.loss_weight": 0.5,
    "model.mtp.loss_weight_final": 0.2,
    "model.mtp.weight_switch": 0.6,
    "train.compile": True,
    "train.fp8": False,
}


def compose_train(*overrides: str):
    with initialize_config_dir(str(REPO / "configs"), version_base="1.3"):
        return compose("train", overrides=["run.dir=/tmp/x", *overrides])


def test_every_moved_key_is_covered():
    assert set(OLD) == set(MOVED_KEYS)


def test_old_spellings_land_in_their_new_place_with_one_deprecation_line_each():
    raw = compose_train(*(f"{k}={v}" for k, v in OLD.items()))
    notes = move_deprecated_keys(raw, quiet=True)
    cfg: PretrainConfig = to_object_strict(raw)
    for old, value in OLD.items():
        section, key = MOVED_KEYS[old].split(".", 1)
        node = getattr(cfg, section)
        for part in key.split("."):
            node = getattr(node, part)
        assert node == value, (old, MOVED_KEYS[old], node)
    assert type(cfg.model) is ModelConfig  # the architecture alone reaches the model and the checkpoints
    assert len(notes) == len(OLD) - 1 and not any("model.moe.ep_size" in n for n in notes)  # an alias, no warning
    assert all("is deprecated: it moved to" in n for n in notes)


def test_new_spellings_need_no_migration():
    raw = compose_train("execution.attn_backend=eager", "parallel.ep_size=2", "train.moe.gamma=0.01")
    assert move_deprecated_keys(raw, quiet=True) == []
    cfg: PretrainConfig = to_object_strict(raw)
    assert cfg.execution.attn_backend == "eager" and cfg.parallel.ep_size == 2 and cfg.train.moe.gamma == 0.01
