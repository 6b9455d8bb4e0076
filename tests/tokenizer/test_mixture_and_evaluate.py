"""Training from a data config (budgets, held-out text, report.json), special-token ids, evaluate, pre-segmentation."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from tests.helpers import sample_data_config
from tests.tokenizer.test_tokenizer import NFC_DIVERGENT
from tokenizer.config import TokenizerConfig
from tokenizer.sampling import HELD_OUT_EVERY, held_out_texts, is_held_out, plan, source_texts, training_texts
from tokenizer.tokenizer import EXTRA_SPECIAL_PIECES, SPECIAL_IDS, Tokenizer, normalize
from tokenizer.train import train_from_data, train_tokenizer

REPO = Path(__file__).resolve().parents[2]
CFG = TokenizerConfig(
    name="mix2k",
    vocab_size=2048,
    character_coverage=0.995,
    max_chars=400_000,
    held_out_sources=["chatbot"],
    eval_max_chars=30_000,
)


@pytest.fixture(scope="module")
def data():
    return sample_data_config()


@pytest.fixture(scope="module")
def trained(data, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("mix")
    return out, train_from_data(CFG, data, out, progress=False)


@pytest.fixture(scope="module")
def hf_mix(trained):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(trained[0], local_files_only=True)


def test_budgets_follow_weights():
    data = sample_data_config(sources={"nsmc": {"weight": 3.0}})
    split = plan(data, 600_000, ["chatbot"])
    assert "chatbot" not in split.budgets and split.held_out_sources == ["chatbot"]
    # kowiki, nsmc x3, legal_precedents, constitution: 6 shares of 100,000
    assert split.budgets == {"kowiki": 100_000, "nsmc": 300_000, "legal_precedents": 100_000, "constitution": 100_000}
    assert plan(data, 1000, ["nosuch", "chatbot"]).held_out_sources == ["chatbot"]  # ignored, with a note
    with pytest.raises(ValueError, match="no training source"):
        plan(data, 1000, list(data.sources))


def test_training_text_respects_budget_and_holds_out():
    data = sample_data_config(max_docs_per_source=300)
    split = plan(data, 200_000, ["chatbot"])
    texts = list(training_texts(data, split, progress=False))
    assert sum(map(len, texts)) <= sum(split.budgets.values())
    held = {t for i, t in source_texts(data, "kowiki") if is_held_out(i)}
    assert held and not held & set(texts)
    chatbot = {t for _, t in source_texts(data, "chatbot")}
    assert not chatbot & set(texts)
    evals = held_out_texts(data, split, 10_000)
    assert "chatbot (unseen)" in evals and evals["kowiki"][0] in held
    assert all(sum(map(len, v)) <= 10_000 for v in evals.values())


def test_held_out_every():
    assert [i for i in range(2 * HELD_OUT_EVERY + 5) if is_held_out(i)] == [HELD_OUT_EVERY - 1, 2 * HELD_OUT_EVERY - 1]


def test_report(trained):
    out, report = trained
    assert json.loads((out / "report.json").read_text()) == report
    assert report["vocab_size"] == 2048 and report["tokenizer"]["held_out_sources"] == ["chatbot"]
    assert {"kowiki", "nsmc", "legal_precedents", "chatbot (unseen)"} <= set(report["held_out"])
    for m in report["held_out"].values():
        assert m["round_trip"] and m["chars_per_token"] > 1.0
    share = report["vocab_share"]
    assert share["special"] == pytest.approx(64 / 2048, abs=1e-4) and share["byte"] == pytest.approx(
        256 / 2048, abs=1e-4
    )
    assert abs(sum(share.values()) - 1) < 1e-3 and share["hangul"] > 0.4
    assert report["min_chars_per_token_by_language"]["ko"] > 1.0


def test_special_token_ids(trained):
    from transformers import AutoTokenizer

    out, _ = trained
    tok = Tokenizer.from_dir(out)
    hf = AutoTokenizer.from_pretrained(out, local_files_only=True)
    assert len(SPECIAL_IDS) == 64 and list(SPECIAL_IDS.values()) == list(range(64))
    for piece, i in SPECIAL_IDS.items():
        assert tok.id_to_piece(i) == piece and hf.convert_ids_to_tokens(i) == piece
    assert tok.id_to_piece(64) == "<0x00>" and tok.id_to_piece(319) == "<0xFF>"
    assert tok.special_id("<|fim_middle|>") == 5 and tok.special_id("<|im_start|>") == 8
    # Each extra special piece is one id in text and decodes to itself, in SentencePiece and HF alike.
    text = "<|fim_prefix|>def f():<|fim_suffix|>\n    return 1<|fim_middle|><|im_start|><|user|>\n안녕<|im_end|>"
    ids = tok.encode(text)
    assert [i for i in ids if i < 64] == [4, 6, 5, 8, 11, 9]
    assert hf.encode(text, add_special_tokens=False) == ids
    assert tok.decode(ids) == hf.decode(ids) == text
    assert all(tok.decode([SPECIAL_IDS[p]]) == p for p in EXTRA_SPECIAL_PIECES)


def test_old_model_without_extra_specials(tmp_path):
    # A model trained before the special-token table still loads; asking it for a FIM id is refused clearly.
    import sentencepiece as spm

    corpus = tmp_path / "c.txt"
    corpus.write_text("가나다라 마바사 abc def\n" * 200, encoding="utf-8")
    spm.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(tmp_path / "tokenizer"), vocab_size=275, byte_fallback=True,
        hard_vocab_limit=False, pad_id=0, bos_id=1, eos_id=2, unk_id=3, minloglevel=2,
    )  # fmt: skip
    tok = Tokenizer(tmp_path / "tokenizer.model")
    with pytest.raises(ValueError, match="retrain"):
        tok.special_id("<|fim_prefix|>")


@settings(max_examples=100, deadline=None, database=None)
@given(text=st.text(alphabet=st.characters(codec="utf-8")) | st.sampled_from(["가 나", "\t\n  x", "다. (주)"]))
def test_hf_matches_with_word_and_script_splits(trained, hf_mix, text):
    # The mixture tokenizer keeps SentencePiece's default splits (as ko8k does); HF must still agree.
    tok = Tokenizer.from_dir(trained[0])
    assume(not NFC_DIVERGENT.intersection(text))
    ids = tok.encode(text)
    assert hf_mix.encode(text, add_special_tokens=False) == ids
    assert hf_mix.decode(ids) == tok.decode(ids) == normalize(text).replace("\u2581", " ")


def test_evaluate_cli(trained, tmp_path):
    out, _ = trained
    files = [REPO / "data" / "eval" / "kowiki_heldout.txt", REPO / "data" / "samples" / "code" / "cpython-sample.jsonl"]
    result = tmp_path / "eval.json"
    cmd = [sys.executable, "-m", "tokenizer.evaluate", f"tokenizer.path={out}", f"eval.files=[{files[0]},{files[1]}]"]
    cmd += ["eval.max_chars=50000", f"eval.out={result}", f"eval.references=[{out},{tmp_path}/missing]"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "| file | tokenizer |" in proc.stdout and "skipping" in proc.stderr
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    assert results == json.loads(result.read_text())
    ko = results[str(files[0])]
    ours, ref = ko[f"ours ({out.name})"], ko[f"hf {out.name}"]  # our tokenizer.json as a reference: same counts
    assert ours["tokens"] == ref["tokens"] and ours["round_trip"] and ref["round_trip"]
    assert ours["mb_per_s_1_thread"] > 0 and ours["mb_per_s_all_cores"] > 0
    assert 1.0 < ours["chars_per_token"] < 5 and ours["tokens_per_eojeol"] > 1.0


def test_evaluate_needs_files(trained):
    out, _ = trained
    cmd = [sys.executable, "-m", "tokenizer.evaluate", f"tokenizer.path={out}", "eval.files=[nosuch.txt]"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "error: eval.files" in proc.stderr


def test_kiwi_pre_segmentation(tmp_path):
    pytest.importorskip("kiwipiepy")
    from tokenizer.morph import MorphemeCutter

    lines = ["나는 학교에 갔다.", "대한민국의 헌법은 1948년에 제정되었다.", "Python 코드", ""]
    cuts = list(MorphemeCutter(1).cuts(lines))
    assert ["".join(c) for c in cuts] == lines
    assert cuts[0] == ["나", "는 학교", "에 갔", "다."]
    texts = (REPO / "data" / "eval" / "kowiki_heldout.txt").read_text(encoding="utf-8")[:30_000].split("\n\n")
    cfg = TokenizerConfig(name="kiwi", vocab_size=1024, character_coverage=0.99, pre_segment="kiwi")
    tok = Tokenizer.from_dir(train_tokenizer(texts, cfg, tmp_path))
    pieces = [tok.id_to_piece(i) for i in range(tok.vocab_size)]
    assert "▁방정식" in pieces and "▁방정식은" not in pieces  # no piece spans a morpheme boundary
    text = "헌법재판소는 대한민국의 최고 법원이다."
    assert tok.decode(tok.encode(text)) == normalize(text)


def test_resume_with_another_tokenizer_is_refused(tmp_path):
    # Issue 3, point 7: a run records its tokenizer's hash and refuses to resume with another one.
    from model.config import ModelConfig
    from train.checkpoint.compat import check_compatible, model_meta

    model = ModelConfig()
    meta = model_meta(model, "a" * 64)
    check_compatible(meta, model, "a" * 64, tmp_path)
    with pytest.raises(ValueError, match="trained with tokenizer sha256 a+, but tokenizer.path now has b+"):
        check_compatible(meta, model, "b" * 64, tmp_path)
