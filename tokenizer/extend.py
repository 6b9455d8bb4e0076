"""`python -m tokenizer.extend base=HF_DIR add=TOKDIR out=DIR [max_added=4096] [eval_files=a.txt,b.txt]`:
add the Korean pieces of a Hangang tokenizer (TOKDIR, from tokenizer.train) that an open model's tokenizer
(HF_DIR) lacks, and write the extended Hugging Face tokenizer to DIR.

Every base token keeps its id. The new pieces become added tokens after the base model's embedding rows (when the
base reserves more rows than its tokenizer uses, as Qwen does, the gap is filled with reserved special tokens so the
new ids start past the base's rows), taken in the Hangang tokenizer's order (most frequent first), at most
`max_added`. DIR/hangang_extension.json records each new piece's tokenization by the base tokenizer, from which
`init.from_hf` initialises its embedding and output rows (their mean), and the model's vocabulary size: base rows
plus new pieces, rounded up to a multiple of 128."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

from tokenizer.hf_tokenizer import EXTENSION_FILE, HFTextTokenizer
from tokenizer.tokenizer import Tokenizer

SPACE = "\u2581"
HANGUL = re.compile("[\uac00-\ud7a3\u1100-\u11ff\u3130-\u318f]")
VOCAB_MULTIPLE = 128


def korean_pieces(tok: Tokenizer) -> list[str]:
    """Normal pieces holding Hangul, in the model's order (BPE: merge order; unigram: by score)."""
    sp = tok._sp
    return [sp.id_to_piece(i) for i in range(sp.get_piece_size())
            if not (sp.is_control(i) or sp.is_unknown(i) or sp.is_byte(i) or sp.is_unused(i))
            and HANGUL.search(sp.id_to_piece(i))]  # fmt: skip


def uses_metaspace(base) -> bool:
    """Whether the base tokenizer writes spaces as U+2581 (SentencePiece style) rather than as bytes (GPT-2 style)."""
    spec = json.loads(base.backend_tokenizer.to_str())
    return SPACE in json.dumps([spec.get("normalizer"), spec.get("pre_tokenizer")], ensure_ascii=False)


def chars_per_token(tok: HFTextTokenizer, texts: list[str]) -> float:
    return sum(len(t) for t in texts) / max(1, sum(len(ids) for ids in tok.encode_batch(texts)))


def extend(base_dir: str | Path, add_dir: str | Path, out: str | Path, max_added: int = 4096) -> dict:
    """Write the extended tokenizer and hangang_extension.json to `out`; returns the extension record."""
    from transformers import AddedToken, PreTrainedTokenizerFast

    base_dir, out = Path(base_dir), Path(out)
    config = base_dir / "config.json"
    if not config.is_file():
        raise FileNotFoundError(f"{config} not found: base= must be a Hugging Face model directory")
    base_rows = json.loads(config.read_text())["vocab_size"]
    HFTextTokenizer(base_dir)  # a clear error when tokenizer.json is missing
    # tokenizer.json as it is: AutoTokenizer would rebuild it from the model type's template (transformers 5).
    base = PreTrainedTokenizerFast.from_pretrained(base_dir)
    base_vocab = base.get_vocab()
    if len(base) > base_rows:
        raise ValueError(f"{base_dir}: the tokenizer has {len(base)} tokens but the model {base_rows} embedding rows")
    metaspace = uses_metaspace(base)
    new, seen = [], set()
    for piece in korean_pieces(Tokenizer.from_dir(add_dir)):
        text = piece.replace(SPACE, " ")
        form = piece if metaspace else text
        if form in base_vocab or form in seen:
            continue
        seen.add(form)
        new.append((form, text))
        if len(new) == max_added:
            break
    ext = base  # extended in place after the base tokenizations are taken
    base_ids = [base.encode(text, add_special_tokens=False) for _, text in new]
    reserved = [f"<|hangang_reserved_{i}|>" for i in range(base_rows - len(base))]
    if reserved:
        ext.add_tokens([AddedToken(t, special=True, normalized=False) for t in reserved], special_tokens=True)
    first = len(ext)
    ext.add_tokens([AddedToken(form, special=False, normalized=True, single_word=False, lstrip=False, rstrip=False)
                    for form, _ in new])  # fmt: skip
    out.mkdir(parents=True, exist_ok=True)
    ext.save_pretrained(out)
    for stale in ("tokenizer.model",):  # a slow-tokenizer file would describe the base vocabulary only
        (out / stale).unlink(missing_ok=True)
    vocab = ext.get_vocab()
    record = {
        "base": str(base_dir.resolve()),
        "add": str(Path(add_dir).resolve()),
        "base_vocab_size": base_rows,
        "base_tokenizer_size": base_rows - len(reserved),
        "added": [
            {"id": vocab[form], "piece": form, "base_ids": ids} for (form, _), ids in zip(new, base_ids, strict=True)
        ],
        "vocab_size": -(-(first + len(new)) // VOCAB_MULTIPLE) * VOCAB_MULTIPLE,
    }
    if [a["id"] for a in record["added"]] != list(range(first, first + len(new))):
        raise RuntimeError("the added pieces did not get consecutive ids after the base's rows")
    (out / EXTENSION_FILE).write_text(json.dumps(record, ensure_ascii=False, indent=1))
    return record


def main(argv: list[str]) -> None:
    usage = ("usage: python -m tokenizer.extend base=HF_DIR add=TOKDIR out=DIR [max_added=4096] "
             "[eval_files=a.txt,b.txt]")  # fmt: skip
    try:
        args = dict(a.split("=", 1) for a in argv)
    except ValueError:
        sys.exit(f"error: arguments are key=value; {usage}")
    unknown = set(args) - {"base", "add", "out", "max_added", "eval_files"}
    missing = {"base", "add", "out"} - set(args)
    if unknown or missing:
        sys.exit(f"error: unknown {sorted(unknown)}, missing {sorted(missing)}; {usage}")
    try:
        record = extend(args["base"], args["add"], args["out"], int(args.get("max_added", 4096)))
        summary = {"out": args["out"], "added": len(record["added"]), "base_vocab_size": record["base_vocab_size"],
                   "vocab_size": record["vocab_size"]}  # fmt: skip
        if args.get("eval_files"):
            texts = [t for f in args["eval_files"].split(",") for t in Path(f).read_text().splitlines() if t.strip()]
            summary["chars_per_token_before"] = round(chars_per_token(HFTextTokenizer(args["base"]), texts), 4)
            summary["chars_per_token_after"] = round(chars_per_token(HFTextTokenizer(args["out"]), texts), 4)
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")
    print(json.dumps(summary))


if __name__ == "__main__":
    main(sys.argv[1:])
