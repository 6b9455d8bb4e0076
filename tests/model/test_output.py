"""The model API: ModelOutput fields per mode, ModelConfig equality and old checkpoint meta, the trainer's total."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from model.config import MOVED_KEYS, ExecutionConfig, ModelConfig, MoEConfig, MTPConfig
from model.moe import sequence_balance_loss
from model.output import ModelOutput
from model.transformer import Transformer

B, T, V = 2, 12, 64


def dense_cfg(**overrides) -> ModelConfig:
    base = dict(vocab_size=V, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden=64, max_seq_len=32)
    return ModelConfig(**(base | overrides))


def moe_cfg(depth: int = 2) -> ModelConfig:
    return dense_cfg(
        n_layers=3,
        attention="mla",
        kv_lora_rank=16,
        qk_nope_head_dim=8,
        qk_rope_head_dim=8,
        v_head_dim=8,
        moe=MoEConfig(enabled=True, n_routed_experts=4, top_k=2, ffn_hidden=16, first_k_dense=1),
        mtp=MTPConfig(depth=depth),
    )


def data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randint(V, (B, T), generator=g), torch.randint(V, (B, T), generator=g)


def shapes(out: ModelOutput) -> dict:
    return {k: None if v is None else tuple(v.shape) for k, v in out._asdict().items()}


def test_dense_outputs_in_eval_and_training():
    torch.manual_seed(0)
    model = Transformer(dense_cfg())
    x, y = data()
    for train in (False, True):
        model.train(train)
        out = model(x)
        assert isinstance(out, ModelOutput) and isinstance(out, tuple)  # a NamedTuple, rebuilt by ZeRO-3 hooks
        assert shapes(out) == dict(logits=(B, T, V), ce_loss=None, aux_losses=None, mtp_losses=None, expert_loads=None)
        out = model(x, labels=y)
        assert shapes(out) == dict(logits=None, ce_loss=(), aux_losses=None, mtp_losses=None, expert_loads=None)
        assert out.ce_loss.dtype == torch.float32


def test_moe_mtp_outputs_per_mode():
    torch.manual_seed(0)
    model = Transformer(moe_cfg(depth=2))
    x, y = data()
    n_moe = len(model.moe_layers())
    assert n_moe == 4  # 2 MoE decoder layers (first_k_dense=1) + 2 MTP blocks
    out = model.train()(x, labels=y)
    assert shapes(out) == dict(logits=None, ce_loss=(), aux_losses=(n_moe,), mtp_losses=(2,), expert_loads=(n_moe, 4))
    assert out.mtp_losses.requires_grad and out.aux_losses.requires_grad and not out.expert_loads.requires_grad
    assert out.expert_loads.dtype == torch.float32
    assert (out.expert_loads.sum(-1) == torch.tensor([B * T * 2] * 2 + [B * (T - 1) * 2, B * (T - 2) * 2])).all()
    # MTP blocks run only in training with labels: the other modes cover the decoder's MoE layers.
    out = model.train()(x)
    assert shapes(out) == dict(logits=(B, T, V), ce_loss=None, aux_losses=(2,), mtp_losses=None, expert_loads=(2, 4))
    model.eval()
    with torch.no_grad():
        out = model(x, labels=y)
        assert shapes(out) == dict(logits=None, ce_loss=(), aux_losses=None, mtp_losses=None, expert_loads=(2, 4))
        out = model(x)
        assert shapes(out) == dict(
            logits=(B, T, V), ce_loss=None, aux_losses=None, mtp_losses=None, expert_loads=(2, 4)
        )


def test_no_mutable_step_attributes():
    model = Transformer(moe_cfg())
    for name in ("last_stats", "mtp_weight", "update_balance"):
        assert not hasattr(model, name)
    for moe in model.moe_layers():
        assert not hasattr(moe, "last_load") and not hasattr(moe, "last_aux")


def test_trainer_total_equals_the_old_forward_loss():
    """total = ce + lambda * mean(MTP) + alpha * sum(aux), in that order, is bitwise the loss the old forward returned;
    every part is recomputed by hand here from the router's choices and the heads' inputs."""
    torch.manual_seed(0)
    model = Transformer(moe_cfg(depth=2)).train()
    x, y = data()
    routed, head_inputs = [], []
    hooks = [m.gate.register_forward_hook(lambda m, i, o: routed.append(o[:2])) for m in model.moe_layers()]
    hooks += [
        n.register_forward_hook(lambda m, i, o: head_inputs.append(o))
        for n in [model.norm, *(k.norm for k in model.mtp)]
    ]
    out = model(x, labels=y)
    for h in hooks:
        h.remove()
    lam, alpha = 0.3, 1e-4
    total = out.ce_loss + lam * out.mtp_losses.mean() + alpha * out.aux_losses.sum()

    def ce(h: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(
            F.linear(h, model.lm_head.weight).float().flatten(0, 1), labels.flatten(), ignore_index=-100
        )

    mtp = [ce(h, y[:, k:]) for k, h in enumerate(head_inputs[1:], start=1)]
    auxes = []
    for scores, idx in routed:
        t = scores.size(0) // B  # MTP depth k sees T - k positions
        auxes.append(sequence_balance_loss(scores.view(B, t, -1), idx.view(B, t, -1)))
    old = ce(head_inputs[0], y)  # the old Transformer.forward, step by step
    old = old + lam * torch.stack(mtp).mean()
    old = old + alpha * torch.stack(auxes).sum()
    assert torch.equal(total, old)
    loads = torch.stack([torch.bincount(idx.flatten(), minlength=4).float() for _, idx in routed])
    assert torch.equal(out.expert_loads, loads)


def test_model_config_equality_is_the_architecture():
    assert ModelConfig(name="a") == ModelConfig(name="b")
    assert ModelConfig(d_model=256) != ModelConfig(d_model=512)
    assert ModelConfig(moe=MoEConfig(enabled=True)) != ModelConfig()
    assert ModelConfig(mtp=MTPConfig(depth=1)) != ModelConfig()
    names = {f.name for f in dataclasses.fields(ModelConfig)}
    assert not names & {"attn_backend", "loss_impl", "loss_chunk_size", "kernels", "activation_checkpointing"}
    assert {f.name for f in dataclasses.fields(MoEConfig)} == {
        "enabled", "n_routed_experts", "n_shared_experts", "top_k", "ffn_hidden", "first_k_dense", "n_group",
        "topk_group", "route_scale",
    }  # fmt: skip
    assert {f.name for f in dataclasses.fields(MTPConfig)} == {"depth"}


def test_from_dict_reads_old_checkpoint_meta():
    old = dataclasses.asdict(moe_cfg(depth=1))
    old |= dict(attn_backend="flex", loss_impl="chunked", loss_chunk_size=128, kernels="liger")
    old |= dict(activation_checkpointing="full")
    old["moe"] |= dict(balance="aux_loss", gamma=0.0, gamma_until=0.9, seq_aux_alpha=0.0, aux_loss_alpha=0.1)
    old["moe"] |= dict(ep_size=2, expert_impl="loop")
    old["mtp"] |= dict(loss_weight=0.5, loss_weight_final=0.2, weight_switch=0.5)
    assert ModelConfig.from_dict(old) == moe_cfg(depth=1)
    moved = (
        {k for k in MOVED_KEYS if "." not in k} | {f"moe.{k}" for k in old["moe"]} | {f"mtp.{k}" for k in old["mtp"]}
    )
    assert set(MOVED_KEYS) <= moved
    assert ModelConfig.from_dict(dataclasses.asdict(moe_cfg())).name == "tiny"


@pytest.mark.parametrize("where", ["top", "moe", "mtp"])
def test_from_dict_refuses_unknown_keys(where):
    d = dataclasses.asdict(moe_cfg())
    (d if where == "top" else d[where])["n_wizards"] = 3
    with pytest.raises(ValueError, match="n_wizards"):
        ModelConfig.from_dict(d)


def test_execution_config_validation_names_the_new_keys():
    for key, bad in (("attn_backend", "cuda"), ("expert_impl", "triton"), ("loss_impl", "fused")):
        with pytest.raises(ValueError, match=f"execution.{key}="):
            ExecutionConfig(**{key: bad})
    with pytest.raises(ValueError, match="execution.loss_chunk_size"):
        ExecutionConfig(loss_chunk_size=0)
    assert ExecutionConfig() == ExecutionConfig(
        attn_backend="sdpa", loss_impl="torch", loss_chunk_size=4096, kernels="torch",
        activation_checkpointing="none", expert_impl="auto", compile=False, fp8=False,
    )  # fmt: skip
