"""evaluate and export entry points on a real trained run: JSON contract, and parity with transformers."""

from __future__ import annotations

import json
import math

import pytest
import torch

from tests.helpers import REPO, run_module
from tokenizer.tokenizer import Tokenizer
from train.checkpoint.weights import load_model

pytestmark = pytest.mark.slow  # torchrun jobs: excluded by `make test-fast`

TEXTS = [
    "대한민국 헌법 제1조 ① 대한민국은 민주공화국이다.",
    "이 영화 정말 재밌어요 ㅋㅋ 10점 만점에 9점!",
    "def f(x):\n    return x + 1\n",
]


def test_evaluate_prints_one_json_line_per_file(trained_run, tmp_path):
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text((REPO / "data/eval/nsmc_heldout.txt").read_text()[:3000])
    b.write_text("짧은 글.")
    proc = run_module("train.evaluate", f"run.dir={trained_run}", f"eval.text_files=[{a},{b}]")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert set(result) == {str(a), str(b)}
    for r in result.values():
        assert r["tokens"] > 0 and math.isfinite(r["loss"]) and math.isclose(r["ppl"], math.exp(r["loss"]))


def test_evaluate_missing_file_is_a_clear_error(trained_run, tmp_path):
    proc = run_module("train.evaluate", f"run.dir={trained_run}", f"eval.text_files=[{tmp_path}/no.txt]", check=False)
    assert proc.returncode == 2 and "no.txt" in proc.stderr


@pytest.fixture(scope="module")
def exported(trained_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("hf")
    proc = run_module("train.export", f"run.dir={trained_run}", f"out={out}")
    info = json.loads(proc.stdout.strip().splitlines()[-1])
    assert info["step"] == 10
    return out


def test_export_loads_as_llama_with_equal_logits(trained_run, exported):
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(exported).eval()
    assert type(hf).__name__ == "LlamaForCausalLM"
    ours, _ = load_model(trained_run)
    ids = torch.randint(0, ours.cfg.vocab_size, (2, 48), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        diff = (hf(ids).logits.float() - ours(ids).logits.float()).abs().max().item()
    assert diff <= 1e-4, diff


def test_exported_tokenizer_gives_our_ids(tiny_tokenizer, exported):
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(exported)
    ours = Tokenizer.from_dir(tiny_tokenizer)
    for text in TEXTS:
        assert hf.encode(text, add_special_tokens=False) == ours.encode(text)
        assert hf.decode(hf.encode(text, add_special_tokens=False)) == ours.decode(ours.encode(text))
