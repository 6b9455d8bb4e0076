"""Batch layout arithmetic and learning-rate schedules."""

from __future__ import annotations

import math

import pytest

from train.engine.schedules import lr_multiplier
from train.trainer.layout import make_layout


def test_layout_derives_grad_accum():
    layout = make_layout(global_batch_tokens=4096 * 64, seq_len=4096, micro_batch_size=4, dp_size=8)
    assert (layout.grad_accum, layout.global_batch_seqs, layout.global_batch_tokens) == (2, 64, 4096 * 64)


@pytest.mark.parametrize("tokens,seq,micro,dp,msg", [(1000, 64, 1, 1, "not a multiple"), (640, 64, 2, 2, "divide")])
def test_layout_errors_name_the_fix(tokens, seq, micro, dp, msg):
    with pytest.raises(ValueError, match=msg):
        make_layout(tokens, seq, micro, dp)


def test_cosine_warms_up_then_decays_to_min():
    f = lr_multiplier("cosine", warmup=10, max_steps=110, min_ratio=0.1, decay_fraction=0.2)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(10) == pytest.approx(1.0) and f(60) == pytest.approx(0.55)
    assert f(110) == pytest.approx(0.1)
    assert all(f(s) >= f(s + 1) for s in range(10, 110))


def test_wsd_is_flat_then_decays_linearly():
    f = lr_multiplier("wsd", warmup=10, max_steps=100, min_ratio=0.0, decay_fraction=0.2)
    assert f(50) == 1.0 and f(79) == 1.0
    assert f(90) == pytest.approx(0.5) and f(100) == pytest.approx(0.0)


def test_constant_after_warmup():
    f = lr_multiplier("constant", warmup=5, max_steps=100, min_ratio=0.1, decay_fraction=0.2)
    assert f(2) == pytest.approx(0.6) and f(50) == 1.0 and math.isclose(f(99), 1.0)
