"""The Hugging Face tokenizer.json adapter: byte table for bits per byte, eos without tokenizer_config.json."""

from __future__ import annotations

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from tokenizer.hf_tokenizer import HFTextTokenizer, load_any

TEXTS = [
    "대한민국 법원은 판결을 선고한다.",
    "영화가 정말 재미있어요!! 10점 만점",
    "def f(x):\n    return x + 1",
    "naïve café",
]


def byte_level_dir(tmp_path):
    """A GPT-2-style byte-level BPE (as Polyglot-Ko's) with `</s>` added as a special token, no tokenizer_config."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<pad>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())  # fmt: skip
    tok.train_from_iterator(TEXTS * 20, trainer)
    tok.save(str(tmp_path / "tokenizer.json"))
    return tmp_path


def test_token_bytes_add_up_to_the_decoded_utf8_bytes(tmp_path):
    tok = load_any(byte_level_dir(tmp_path))
    assert isinstance(tok, HFTextTokenizer)
    table = tok.token_bytes()
    assert len(table) == tok.vocab_size and table[tok.eos_id] == 0
    for text in [*TEXTS, "처음 보는 낱말: 갉아먹다 ☃"]:
        ids = tok.encode(text)
        assert sum(table[i] for i in ids) == len(tok.decode(ids).encode("utf-8")) == len(text.encode("utf-8"))


def test_eos_is_found_among_added_tokens_without_a_tokenizer_config(tmp_path):
    tok = HFTextTokenizer(byte_level_dir(tmp_path))
    assert tok.id_to_piece(tok.eos_id) == "</s>"
