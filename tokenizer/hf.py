"""Hugging Face files for a trained SentencePiece model: tokenizer.json, tokenizer_config.json, special_tokens_map.json.

The fast tokenizer reproduces our encoding exactly (NFC, then SentencePiece with the identity normalizer), so a
checkpoint exported with these files tokenizes as it was trained. SentencePiece BPE merges the adjacent pair whose
merged piece has the highest score; a `tokenizers` BPE merges the pair of lowest rank, so the merges are listed
in descending score of the piece they produce.
"""

from __future__ import annotations

import json
from pathlib import Path

from sentencepiece import sentencepiece_model_pb2 as spm_pb2
from tokenizers import AddedToken, decoders, models, normalizers
from tokenizers import Tokenizer as HFTokenizer

from tokenizer.nfc import RULE_NAME as NFC_RULE_NAME

SPACE = "\u2581"  # "▁", SentencePiece's visible space
HF_NO_MAX_LENGTH = int(1e30)
"""transformers' own "no limit known" value of model_max_length."""

_Piece = spm_pb2.ModelProto.SentencePiece
_SPECIAL_TOKENS = {"pad_token": 0, "bos_token": 1, "eos_token": 2, "unk_token": 3}


def load_model_proto(model_path: str | Path) -> spm_pb2.ModelProto:
    """Parse a tokenizer.model and check it uses the normalization this module reproduces."""
    proto = spm_pb2.ModelProto()
    proto.ParseFromString(Path(model_path).read_bytes())
    norm = proto.normalizer_spec
    # Anything else (NFKC tables, dummy prefix, whitespace folding) would need its own HF normalizer.
    if (
        norm.name not in ("identity", NFC_RULE_NAME)  # NFC_RULE_NAME: NFC as a precompiled map, which HF's NFC covers
        or norm.add_dummy_prefix
        or norm.remove_extra_whitespaces
        or not norm.escape_whitespaces
        or proto.trainer_spec.treat_whitespace_as_suffix
    ):
        raise ValueError(
            f"{model_path}: only models trained by tokenizer.train (identity normalization, no dummy prefix, "
            "whitespace kept) can be converted"
        )
    return proto


def build_hf_tokenizer(model_path: str | Path) -> HFTokenizer:
    """A `tokenizers.Tokenizer` whose ids equal `tokenizer.Tokenizer(model_path).encode` for every text."""
    proto = load_model_proto(model_path)
    pieces = list(proto.pieces)
    byte_fallback = proto.trainer_spec.byte_fallback
    unk_id = proto.trainer_spec.unk_id
    if proto.trainer_spec.model_type == spm_pb2.TrainerSpec.BPE:
        vocab = {p.piece: i for i, p in enumerate(pieces)}
        model = models.BPE(
            vocab=vocab,
            merges=_bpe_merges(pieces),
            unk_token=pieces[unk_id].piece,
            fuse_unk=True,  # SentencePiece emits one <unk> for a run of unknown characters
            byte_fallback=byte_fallback,
        )
    elif proto.trainer_spec.model_type == spm_pb2.TrainerSpec.UNIGRAM:
        model = models.Unigram(_unigram_vocab(pieces), unk_id=unk_id, byte_fallback=byte_fallback)
    else:
        raise ValueError(f"{model_path}: model type {proto.trainer_spec.model_type} is neither BPE nor unigram")

    tok = HFTokenizer(model)
    # No pre-tokenizer: SentencePiece merges over the whole text (whitespace-only pieces included), so HF must too.
    tok.normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Replace(" ", SPACE)])
    tok.decoder = decoders.Sequence([decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse()])
    # Control and unknown pieces are never matched in text by SentencePiece; user-defined symbols always are.
    tok.add_special_tokens(
        [
            AddedToken(p.piece, special=True, normalized=False)
            for p in pieces
            if p.type in (_Piece.CONTROL, _Piece.UNKNOWN)
        ]
    )
    tok.add_tokens(
        [AddedToken(p.piece, special=False, normalized=False) for p in pieces if p.type == _Piece.USER_DEFINED]
    )
    return tok


def _bpe_merges(pieces: list) -> list[tuple[str, str]]:
    """Every (left, right) split of every normal piece, ordered as SentencePiece would apply them."""
    normal = {p.piece for p in pieces if p.type == _Piece.NORMAL}
    ranked = []
    for i, p in enumerate(pieces):
        if p.type != _Piece.NORMAL or len(p.piece) < 2:
            continue
        for cut in range(1, len(p.piece)):
            left, right = p.piece[:cut], p.piece[cut:]
            if left in normal and right in normal:
                ranked.append((-p.score, i, cut, left, right))
    ranked.sort()
    return [(left, right) for *_, left, right in ranked]


def _unigram_vocab(pieces: list) -> list[tuple[str, float]]:
    """(piece, score) with non-normal pieces priced out of the lattice, where SentencePiece never puts them."""
    normal_scores = [p.score for p in pieces if p.type == _Piece.NORMAL]
    # Low enough that a literal "<s>" or "<0x41>" in text is spelled with normal pieces, small enough to keep
    # float64 lattice sums exact to ~1e-12. (HF's unknown-piece score follows the minimum down; every path pays
    # it once per unknown character, so the best path is unchanged.)
    priced_out = min(normal_scores) - 1e4
    return [(p.piece, p.score if p.type in (_Piece.NORMAL, _Piece.USER_DEFINED) else priced_out) for p in pieces]


def write_hf_files(model_path: str | Path, out_dir: str | Path, *, model_max_length: int = HF_NO_MAX_LENGTH) -> None:
    """Write tokenizer.json, tokenizer_config.json and special_tokens_map.json for `AutoTokenizer` into out_dir."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = build_hf_tokenizer(model_path)
    tok.save(str(out / "tokenizer.json"))
    special = {name: tok.id_to_token(i) for name, i in _SPECIAL_TOKENS.items()}
    config = {
        # The generic fast class loads tokenizer.json as is; model classes (LlamaTokenizer...) rebuild parts of it.
        "tokenizer_class": "PreTrainedTokenizerFast",
        **special,
        "add_bos_token": False,
        "add_eos_token": False,
        "model_max_length": model_max_length,
        "clean_up_tokenization_spaces": False,
        # SentencePiece reads "<s>" in text as the characters <, s, >; without this HF would read it as bos.
        "split_special_tokens": True,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
    (out / "special_tokens_map.json").write_text(json.dumps(special, indent=2, ensure_ascii=False) + "\n")
