"""Loss implementations, fused kernels and activation checkpointing against the pure-PyTorch reference."""

from __future__ import annotations

import weakref

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from model.config import ExecutionConfig, ModelConfig, MoEConfig, MTPConfig
from model.loss import LigerUnavailableError, chunked_cross_entropy
from model.output import ModelOutput
from model.transformer import Transformer

HAS_LIGER = True
try:
    import liger_kernel  # noqa: F401
except ImportError:
    HAS_LIGER = False
gpu_liger = pytest.mark.skipif(not (torch.cuda.is_available() and HAS_LIGER), reason="needs CUDA and liger-kernel")


def dense_cfg(**overrides) -> ModelConfig:
    base = dict(vocab_size=96, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden=64, max_seq_len=32)
    return ModelConfig(**(base | overrides))


def moe_cfg(**overrides) -> ModelConfig:
    base = dict(
        vocab_size=96, d_model=32, n_layers=2, n_heads=4, n_kv_heads=4, ffn_hidden=64, max_seq_len=32,
        attention="mla", kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8,
        moe=MoEConfig(enabled=True, n_routed_experts=4, top_k=2, ffn_hidden=16, first_k_dense=1),
        mtp=MTPConfig(depth=1),
    )  # fmt: skip
    return ModelConfig(**(base | overrides))


def batch(cfg: ModelConfig, B: int = 2, T: int = 16, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(cfg.vocab_size, (B, T), generator=g)
    y = torch.randint(cfg.vocab_size, (B, T), generator=g)
    y[0, :5] = -100  # ignored positions (document padding, masked prompts)
    y[1, -1] = -100
    return x, y


def train_loss(out: ModelOutput) -> torch.Tensor:
    """The training loss as the trainer composes it, at MTP weight 0.3 and balance-loss alpha 1e-4."""
    total = out.ce_loss
    if out.mtp_losses is not None:
        total = total + 0.3 * out.mtp_losses.mean()
    if out.aux_losses is not None:
        total = total + 1e-4 * out.aux_losses.sum()
    return total


def loss_and_grads(cfg: ModelConfig, x: torch.Tensor, y: torch.Tensor, **execution) -> tuple[torch.Tensor, dict]:
    torch.manual_seed(0)
    model = Transformer(cfg, ExecutionConfig(**execution)).train()
    loss = train_loss(model(x, labels=y))
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def test_chunked_cross_entropy_matches_torch_loss_and_grads():
    g = torch.Generator().manual_seed(0)
    h = torch.randn(37, 16, generator=g, dtype=torch.float32).requires_grad_()
    w = torch.randn(50, 16, generator=g, dtype=torch.float32).requires_grad_()
    y = torch.randint(50, (37,), generator=g)
    y[[0, 3, 36]] = -100
    ref = F.cross_entropy(h @ w.t(), y, ignore_index=-100)
    gh, gw = torch.autograd.grad(ref, (h, w))
    for chunk in (1, 8, 37, 100):  # 8 leaves a ragged last chunk
        out = chunked_cross_entropy(h, w, y, chunk)
        ch, cw = torch.autograd.grad(out, (h, w))
        torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(ch, gh, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(cw, gw, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("make", [dense_cfg, moe_cfg], ids=["dense_tied", "mla_moe_mtp"])
def test_chunked_loss_matches_torch_in_the_model(make):
    """Whole model, fp32: same loss and gradients of every parameter (tied embedding = head included, MTP head)."""
    x, y = batch(make())
    ref_loss, ref_grads = loss_and_grads(make(), x, y, loss_impl="torch")
    loss, grads = loss_and_grads(make(), x, y, loss_impl="chunked", loss_chunk_size=7)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=1e-6)
    assert grads.keys() == ref_grads.keys() and "embed_tokens.weight" in grads
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-5, atol=1e-7, msg=name)


def test_chunked_loss_untied_head():
    x, y = batch(dense_cfg())
    ref_loss, ref_grads = loss_and_grads(dense_cfg(tie_embeddings=False), x, y)
    loss, grads = loss_and_grads(dense_cfg(tie_embeddings=False), x, y, loss_impl="chunked", loss_chunk_size=5)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(grads["lm_head.weight"], ref_grads["lm_head.weight"], rtol=1e-5, atol=1e-7)


def test_chunked_loss_under_bf16_autocast_is_close():
    cfg = dense_cfg()
    x, y = batch(cfg)
    torch.manual_seed(0)
    model = Transformer(cfg).train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = model(x, labels=y).ce_loss
        model.lm_head.impl = "chunked"
        out = model(x, labels=y).ce_loss
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, ref, rtol=2e-2, atol=2e-2)


@pytest.mark.skipif(HAS_LIGER, reason="liger-kernel is installed")
@pytest.mark.parametrize("key", ["loss_impl", "kernels"])
def test_liger_missing_gives_clear_error(key):
    with pytest.raises(LigerUnavailableError, match=f"execution.{key}=liger.*pip install liger-kernel"):
        Transformer(dense_cfg(), ExecutionConfig(**{key: "liger"}))


def test_bad_values_fail():
    with pytest.raises(ValueError, match="execution.activation_checkpointing='some'"):
        ExecutionConfig(activation_checkpointing="some")
    with pytest.raises(ValueError, match="execution.loss_impl"):
        ExecutionConfig(loss_impl="fused")
    with pytest.raises(ValueError, match="execution.kernels"):
        ExecutionConfig(kernels="triton")


class LiveActivations(TorchDispatchMode):
    """Bytes of every tensor produced inside the mode that is still alive afterwards (what autograd kept)."""

    def __init__(self) -> None:
        super().__init__()
        self.outputs: list[weakref.ref] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.outputs += [weakref.ref(t) for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
        return out

    def live_bytes(self) -> int:
        storages = {}
        for ref in self.outputs:
            t = ref()
            if t is not None:
                st = t.untyped_storage()
                storages[st.data_ptr()] = st.nbytes()
        return sum(storages.values())


def saved_bytes(cfg: ModelConfig, x: torch.Tensor, y: torch.Tensor, **execution) -> tuple[int, torch.Tensor, dict]:
    torch.manual_seed(0)
    model = Transformer(cfg, ExecutionConfig(**execution)).train()
    with LiveActivations() as mode:
        loss = train_loss(model(x, labels=y))
    kept = mode.live_bytes()
    loss.backward()
    return kept, loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("make", [dense_cfg, moe_cfg], ids=["dense", "mla_moe_mtp"])
def test_activation_checkpointing_same_grads_less_memory(make):
    x, y = batch(make(), B=2, T=32)
    results = {mode: saved_bytes(make(), x, y, activation_checkpointing=mode) for mode in ("none", "selective", "full")}
    ref_loss, ref_grads = results["none"][1:]
    for mode in ("selective", "full"):
        torch.testing.assert_close(results[mode][1], ref_loss, rtol=0, atol=0)
        for name, grad in results[mode][2].items():
            torch.testing.assert_close(grad, ref_grads[name], rtol=1e-6, atol=1e-8, msg=f"{mode} {name}")
    kept = {mode: r[0] for mode, r in results.items()}
    assert kept["none"] > kept["selective"] > kept["full"] > 0, kept


def test_checkpointing_is_off_in_eval():
    cfg = dense_cfg()
    x, y = batch(cfg)
    torch.manual_seed(0)
    model = Transformer(cfg, ExecutionConfig(activation_checkpointing="full")).eval()
    torch.manual_seed(0)
    ref = Transformer(cfg, ExecutionConfig(activation_checkpointing="none")).eval()
    torch.testing.assert_close(model(x).logits, ref(x).logits)


@pytest.mark.gpu
@gpu_liger
@pytest.mark.parametrize("make", [dense_cfg, moe_cfg], ids=["dense", "mla_moe_mtp"])
def test_liger_matches_torch_on_gpu(make):
    """kernels=liger and loss_impl=liger against the reference, bf16 autocast on one GPU."""
    x, y = (t.cuda() for t in batch(make(), T=32))
    out = {}
    for kernels, impl in (("torch", "torch"), ("liger", "torch"), ("torch", "liger"), ("liger", "liger")):
        torch.manual_seed(0)
        with torch.device("cuda"):
            model = Transformer(make(), ExecutionConfig(kernels=kernels, loss_impl=impl)).train()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = train_loss(model(x, labels=y))
        loss.backward()
        out[kernels, impl] = loss.detach(), {n: p.grad.float() for n, p in model.named_parameters()}
    ref_loss, ref_grads = out["torch", "torch"]
    for key, (loss, grads) in out.items():
        torch.testing.assert_close(loss, ref_loss, rtol=2e-2, atol=2e-2, msg=str(key))
        for name, g in grads.items():
            rel = (g - ref_grads[name]).norm() / ref_grads[name].norm().clamp_min(1e-12)
            assert rel < 5e-2, (key, name, float(rel))


def test_chunked_loss_keeps_no_logits():
    """Autograd keeps at least one fp32 (B*T, V) logits block fewer with loss_impl=chunked."""
    cfg = dense_cfg()
    x, y = batch(cfg, B=2, T=32)
    kept_torch = saved_bytes(cfg, x, y)[0]
    kept_chunked = saved_bytes(cfg, x, y, loss_impl="chunked", loss_chunk_size=8)[0]
    assert kept_torch - kept_chunked >= x.numel() * cfg.vocab_size * 4, (kept_torch, kept_chunked)


def _fp8_ready() -> bool:
    try:
        import torchao.float8  # noqa: F401
    except ImportError:
        return False
    return torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 9)


@pytest.mark.gpu
@pytest.mark.skipif(not _fp8_ready(), reason="needs torchao and an FP8 GPU (sm_89+)")
def test_fp8_loss_stays_within_half_a_percent_of_bf16_on_gpu():
    """Issue 8: FP8 (torchao float8, tensorwise) training losses over the first steps within 0.5% of BF16."""
    from train.engine.optimize import optimize_model

    cfg = ModelConfig(vocab_size=4096, d_model=256, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden=768)
    g = torch.Generator().manual_seed(0)
    data = torch.randint(cfg.vocab_size, (10, 8, 257), generator=g).cuda()
    curves = {}
    for fp8 in (False, True):
        torch.manual_seed(0)
        with torch.device("cuda"):
            model = optimize_model(Transformer(cfg).train(), compile=False, fp8=fp8)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        curves[fp8] = []
        for tokens in data:
            with torch.autocast("cuda", dtype=torch.bfloat16):
                loss = model(tokens[:, :-1], labels=tokens[:, 1:]).ce_loss
            loss.backward()
            opt.step()
            opt.zero_grad()
            curves[fp8].append(loss.item())
    for step, (a, b) in enumerate(zip(curves[False], curves[True], strict=True)):
        assert abs(b - a) / a < 5e-3, (step, a, b)
