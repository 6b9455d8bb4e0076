"""Document masking of packed rows: every backend against the eager reference, GQA and MLA, and against running each
document alone (CPU fp32, tight tolerance); the same on CUDA in bf16 when a GPU is at hand."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from model import attention
from model.config import ExecutionConfig, ModelConfig, check_execution
from model.masking import build_attn_mask, document_ids, document_positions, flash_varlen_boundaries
from model.transformer import Transformer

# CPU flex runs unfused (forward only) and says so once; that is what these tests want.
pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
EOS = 3
T = 32


def make_cfg(attention: str = "gqa", **overrides) -> ModelConfig:
    base = dict(vocab_size=128, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_hidden=96, max_seq_len=64)
    if attention == "mla":  # v_head_dim (12) != qk head dim (16 + 8), as in DeepSeek
        base |= dict(attention="mla", q_lora_rank=16, kv_lora_rank=16, qk_nope_head_dim=16, qk_rope_head_dim=8)
        base |= dict(v_head_dim=12)
    return ModelConfig(**(base | dict(eos_id=EOS) | overrides))


def build(cfg: ModelConfig, backend: str = "sdpa", like: Transformer | None = None) -> Transformer:
    torch.manual_seed(0)
    model = Transformer(cfg, ExecutionConfig(attn_backend=backend)).eval()
    if like is not None:
        model.load_state_dict(like.state_dict())
    return model


def packed_batch() -> torch.Tensor:
    """Row 0: four documents, the last ending exactly at the end; row 1: one document (no eos); row 2: an eos first,
    two eos in a row (a one-token document), a long last document."""
    torch.manual_seed(1)
    x = torch.randint(EOS + 1, 128, (3, T))
    x[0, [5, 17, T - 1]] = EOS
    x[2, [0, 11, 12]] = EOS
    return x


def test_document_ids_and_positions():
    x = torch.tensor([[7, EOS, 8, 9, EOS, EOS, 5], [EOS, 4, 4, 4, 4, 4, EOS]])
    doc = document_ids(x, EOS)
    assert doc.tolist() == [[0, 0, 1, 1, 1, 2, 3], [0, 1, 1, 1, 1, 1, 1]]
    assert document_positions(doc).tolist() == [[0, 1, 0, 1, 2, 0, 0], [0, 0, 1, 2, 3, 4, 5]]
    cu, max_len = flash_varlen_boundaries(doc)
    assert cu.dtype == torch.int32 and cu.tolist() == [0, 2, 5, 6, 7, 8, 14] and max_len == 6


@pytest.mark.parametrize("attn", ["gqa", "mla"])
@pytest.mark.parametrize("backend", ["sdpa", "flex"])
@pytest.mark.parametrize("mode", ["causal", "doc", "doc+reset"])
def test_backend_matches_eager(attn, backend, mode):
    opts = {"causal": {}, "doc": dict(doc_masking=True), "doc+reset": dict(doc_masking=True, doc_position_reset=True)}
    ref = build(make_cfg(attn, **opts[mode]), "eager")
    model = build(make_cfg(attn, **opts[mode]), backend, like=ref)
    x = packed_batch()
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits, ref(x).logits, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("attn", ["gqa", "mla"])
@pytest.mark.parametrize("backend", ["eager", "sdpa", "flex"])
def test_single_document_equals_plain_causal(attn, backend):
    plain = build(make_cfg(attn), backend)
    masked = build(make_cfg(attn, doc_masking=True, doc_position_reset=True), backend, like=plain)
    x = packed_batch()[1:2]  # no eos: one document spanning the row
    with torch.no_grad():
        torch.testing.assert_close(masked(x).logits, plain(x).logits, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("attn", ["gqa", "mla"])
def test_documents_are_independent(attn):
    model = build(make_cfg(attn, doc_masking=True), "eager")
    plain = build(make_cfg(attn), "eager", like=model)
    x = packed_batch()
    x2 = x.clone()
    x2[0, 6:17] = (x[0, 6:17] + 1 - EOS - 1) % (128 - EOS - 1) + EOS + 1  # new tokens in document 1 of row 0, no eos
    with torch.no_grad():
        a, b = model(x).logits, model(x2).logits
        assert not torch.allclose(a[0, 6:17], b[0, 6:17])
        torch.testing.assert_close(a[0, :6], b[0, :6], atol=0, rtol=0)  # earlier document
        # Document 1 runs through its eos at 17; later documents never see it (without masking they do).
        torch.testing.assert_close(a[0, 18:], b[0, 18:], atol=1e-6, rtol=0)
        assert not torch.allclose(plain(x).logits[0, 18:], plain(x2).logits[0, 18:])


@pytest.mark.parametrize("attn", ["gqa", "mla"])
def test_position_reset_equals_each_document_alone(attn):
    model = build(make_cfg(attn, doc_masking=True, doc_position_reset=True), "sdpa")
    x = packed_batch()
    with torch.no_grad():
        packed = model(x).logits
        for row, start, end in [(0, 0, 6), (0, 6, 18), (0, 18, T), (2, 1, 12), (2, 13, T)]:
            alone = model(x[row : row + 1, start:end]).logits[0]
            torch.testing.assert_close(packed[row, start:end], alone, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("backend", ["sdpa", "flex"])
def test_mtp_loss_matches_eager_with_doc_masking(backend):
    opts = dict(doc_masking=True, doc_position_reset=True, mtp={"depth": 2})
    ref = build(make_cfg("mla", **opts), "eager").train()
    model = build(make_cfg("mla", **opts), backend, like=ref).train()
    x = packed_batch()
    y = torch.roll(x, -1, dims=1)
    with torch.no_grad():
        out, want = model(x, labels=y), ref(x, labels=y)
        # The total the trainer composes, at the MTP weight 0.3 (DeepSeek-V3's first phase).
        total, want_total = (o.ce_loss + 0.3 * o.mtp_losses.mean() for o in (out, want))
        torch.testing.assert_close(total, want_total, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(out.mtp_losses.mean(), want.mtp_losses.mean(), atol=1e-5, rtol=1e-5)


class VarlenReference:
    """flash-attn's two entry points computed by the eager reference, one document at a time (CPU, fp32), to test
    the flattening, padding and cu_seqlens plumbing of the flash_attn path where flash-attn cannot run."""

    @staticmethod
    def dense(q, k, v, causal, softmax_scale):  # (B, T, heads, d)
        y = attention.eager_causal_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), softmax_scale)
        return y.transpose(1, 2)

    @staticmethod
    def varlen(q, k, v, cu_q, cu_k, max_q, max_k, causal, softmax_scale):  # (N, heads, d), documents along N
        assert causal and torch.equal(cu_q, cu_k) and max_q == max_k == int((cu_q[1:] - cu_q[:-1]).max())
        out = []
        for s, e in zip(cu_q[:-1].tolist(), cu_q[1:].tolist(), strict=True):
            out.append(VarlenReference.dense(q[None, s:e], k[None, s:e], v[None, s:e], True, softmax_scale)[0])
        return torch.cat(out)


@pytest.mark.parametrize("attn", ["gqa", "mla"])
def test_flash_varlen_plumbing_matches_eager(attn, monkeypatch):
    monkeypatch.setattr(attention, "FlashKernels", VarlenReference)
    ref = build(make_cfg(attn, doc_masking=True), "eager")
    model = build(make_cfg(attn, doc_masking=True), "flash_attn", like=ref)
    x = packed_batch()
    with torch.no_grad():
        torch.testing.assert_close(model(x).logits, ref(x).logits, atol=1e-5, rtol=1e-5)


def test_flex_mask_of_plain_causal_is_cached():
    a = build_attn_mask("flex", None, T, torch.device("cpu"))
    assert a.block_mask is build_attn_mask("flex", None, T, torch.device("cpu")).block_mask
    assert build_attn_mask("sdpa", None, T, torch.device("cpu")) is None  # sdpa keeps its is_causal fast path


def test_clear_errors():
    with pytest.raises(ValueError, match="doc_position_reset=true needs model.doc_masking=true"):
        make_cfg(doc_position_reset=True)
    with pytest.raises(ValueError, match="needs model.eos_id"):
        Transformer(make_cfg(doc_masking=True, eos_id=-1))
    with pytest.raises(ValueError, match="v_head_dim <= qk_nope_head_dim"):
        check_execution(make_cfg("mla", v_head_dim=64), ExecutionConfig(attn_backend="flash_attn"))
    with pytest.raises(ValueError, match="v_head_dim <= qk_nope_head_dim"):  # before flash-attn is imported
        Transformer(make_cfg("mla", v_head_dim=64), ExecutionConfig(attn_backend="flash_attn"))
    model = make_cfg(doc_masking=True)
    with pytest.raises(NotImplementedError, match="no backward pass on CPU"):
        build(model, "flex").train()(packed_batch(), labels=packed_batch())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("attn", ["gqa", "mla"])
@pytest.mark.parametrize("backend", ["sdpa", "flex", "flash_attn"])
@pytest.mark.parametrize("doc_masking", [False, True])
def test_bf16_backends_match_eager_on_gpu(attn, backend, doc_masking):
    """Logits, loss and gradients of every backend against eager under bf16 autocast, at 8 heads of 64 (GQA)."""
    if backend == "flash_attn" and importlib.util.find_spec("flash_attn") is None:
        pytest.skip("flash_attn not installed")
    shape = dict(d_model=512, n_heads=8, n_kv_heads=2, max_seq_len=256, doc_masking=doc_masking)
    if attn == "mla":
        shape |= dict(qk_nope_head_dim=64, qk_rope_head_dim=32, v_head_dim=64, kv_lora_rank=64)
    ref = build(make_cfg(attn, **shape), "eager").cuda()
    model = build(make_cfg(attn, **shape), backend, like=ref).cuda()
    torch.manual_seed(2)
    x = torch.randint(EOS + 1, 128, (2, 256), device="cuda")
    x[0, [40, 41, 130, 255]] = EOS
    x[1, [0, 200]] = EOS
    y = torch.roll(x, -1, dims=1)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        with torch.no_grad():
            out, want = model(x).logits.float(), ref(x).logits.float()
        losses = [m.train()(x, labels=y).ce_loss for m in (model, ref)]
    # bf16 kernels differ from eager by rounding: a few bf16 ulps per logit (H100: at most 0.0625 where |logit| is in
    # [8, 16)), far under 1% of the logits' norm.
    assert ((out - want).norm() / want.norm()).item() < 1e-2
    torch.testing.assert_close(losses[0], losses[1], atol=1e-2, rtol=0)
    for loss in losses:
        loss.backward()
    for (name, p), q in zip(model.named_parameters(), ref.parameters(), strict=True):
        err = (p.grad - q.grad).norm() / q.grad.norm().clamp_min(1e-12)
        assert err < 5e-2, f"{name}: relative gradient error {err:.3g}"
