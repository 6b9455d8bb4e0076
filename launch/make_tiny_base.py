"""`python -m launch.make_tiny_base out=DIR [family=LlamaForCausalLM] [tokenizer=TOKDIR] [layers=4] [seed=0]`:
a tiny randomly initialised Hugging Face model built locally with transformers (never downloaded), as a stand-in
base for `init.from_hf` in tests and the `ko_continue` recipe.

With `tokenizer=TOKDIR` (an HF tokenizer directory) its files are copied and the vocabulary size, bos, eos and pad
ids are taken from it; otherwise the vocabulary is 512 tokens and no tokenizer is written."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import torch

FAMILIES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM", "DeepseekV3ForCausalLM")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model")


def tiny_hf_config(family: str, vocab_size: int = 512, layers: int = 4, **ids):
    """A small transformers config of `family` (fp32) with each family's distinguishing options switched on."""
    import transformers

    common = dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                  num_attention_heads=4, max_position_embeddings=256, rms_norm_eps=1e-6,
                  rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, tie_word_embeddings=False,
                  dtype="float32", **ids)  # fmt: skip
    if family == "LlamaForCausalLM":
        return transformers.LlamaConfig(**{**common, "tie_word_embeddings": True}, num_key_value_heads=2)
    if family == "MistralForCausalLM":
        return transformers.MistralConfig(**common, num_key_value_heads=2, head_dim=16, sliding_window=256)
    if family == "Qwen2ForCausalLM":
        return transformers.Qwen2Config(**common, num_key_value_heads=2)
    if family == "Qwen3ForCausalLM":
        # head_dim 32 != 64 / 4: Qwen3's explicit head width.
        return transformers.Qwen3Config(**common, num_key_value_heads=2, head_dim=32)
    if family == "DeepseekV3ForCausalLM":
        return transformers.DeepseekV3Config(**common, num_key_value_heads=4, moe_intermediate_size=32,
                                             n_routed_experts=4, n_shared_experts=1, num_experts_per_tok=2,
                                             n_group=1, topk_group=1, first_k_dense_replace=1, kv_lora_rank=16,
                                             q_lora_rank=24, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16,
                                             routed_scaling_factor=1.5, rope_interleave=True,
                                             num_mtp_layers=0)  # fmt: skip
    raise ValueError(f"family={family!r}: choose one of {FAMILIES}")


def make_tiny_base(out: str | Path, family: str = "LlamaForCausalLM", tokenizer: str | None = None,
                   layers: int = 4, seed: int = 0):  # fmt: skip
    """Build, randomly initialise (seeded; router biases and norms perturbed so every tensor matters) and save."""
    import transformers

    ids: dict = {}
    vocab = 512
    if tokenizer:
        tok = transformers.AutoTokenizer.from_pretrained(tokenizer)
        vocab = len(tok)
        ids = dict(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    config = tiny_hf_config(family, vocab, layers, **ids)
    torch.manual_seed(seed)
    model = getattr(transformers, family)(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("norm.weight", "layernorm.weight")) or name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.1)  # default ones / zeros would hide a norm or bias mapped wrong
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_(torch.randn_like(b) * 0.01)
    out = Path(out)
    model.save_pretrained(out, safe_serialization=True)
    if tokenizer:
        for name in TOKENIZER_FILES:
            if (Path(tokenizer) / name).is_file():
                shutil.copyfile(Path(tokenizer) / name, out / name)
    return model


def main(argv: list[str]) -> None:
    args = dict(a.split("=", 1) for a in argv)
    unknown = set(args) - {"out", "family", "tokenizer", "layers", "seed"}
    if unknown or "out" not in args:
        sys.exit(f"error: usage: python -m launch.make_tiny_base out=DIR [family=...] [tokenizer=DIR] [layers=N] "
                 f"[seed=N]; unknown {sorted(unknown)}")  # fmt: skip
    try:
        make_tiny_base(args["out"], args.get("family", "LlamaForCausalLM"), args.get("tokenizer"),
                       int(args.get("layers", 4)), int(args.get("seed", 0)))  # fmt: skip
    except ValueError as e:
        sys.exit(f"error: {e}")
    print(json.dumps({"out": args["out"], "family": args.get("family", "LlamaForCausalLM")}))


if __name__ == "__main__":
    main(sys.argv[1:])
