"""The Hugging Face adapter of `model.transformer.Transformer`, both ways.

Export: a state dict as a transformers directory of the model's family (`LlamaForCausalLM`, `MistralForCausalLM`,
`Qwen2ForCausalLM`, `Qwen3ForCausalLM` for GQA; `DeepseekV3ForCausalLM` for MLA, dense or DeepSeekMoE; MTP modules
are training-only and dropped). Import: the `ModelConfig` an HF config.json describes (`model_config_from_hf`) and,
for each of our parameters, where its values lie in the HF safetensors (`hf_sources`), read lazily so a caller can
take just the slice it holds. Both directions use the same name table (`hf_key`): our names are HF's without the
`model.` prefix; the only layouts that differ on disk are DeepseekV3's per-expert weights (fused here, as in
transformers' memory) and an interleaved DeepSeek RoPE (permuted into halves on import).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from model.config import ModelConfig, MoEConfig

if TYPE_CHECKING:
    import transformers

GQA_FAMILIES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM")
FAMILIES = (*GQA_FAMILIES, "DeepseekV3ForCausalLM")
"""The transformers classes `init.from_hf` imports and `train.export` writes."""


def _gqa_kwargs(cfg: ModelConfig, bos_id: int, eos_id: int, pad_id: int) -> dict:
    check_ids(cfg, bos_id, eos_id, pad_id)
    return dict(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.d_model,
        intermediate_size=cfg.ffn_hidden,
        num_hidden_layers=cfg.n_layers,
        num_attention_heads=cfg.n_heads,
        num_key_value_heads=cfg.n_kv_heads,
        hidden_act="silu",
        max_position_embeddings=cfg.max_seq_len,
        initializer_range=cfg.init_std,
        rms_norm_eps=cfg.norm_eps,
        # transformers 5 keeps rope_theta inside rope_parameters (a top-level rope_theta is only a BC alias).
        rope_parameters={"rope_type": "default", "rope_theta": float(cfg.rope_theta)},
        attention_dropout=0.0,
        tie_word_embeddings=cfg.tie_embeddings,
        bos_token_id=bos_id,
        eos_token_id=eos_id,
        pad_token_id=pad_id,
        dtype="float32",  # `torch_dtype` in transformers 4
    )


def hf_llama_config(cfg: ModelConfig, *, bos_id: int, eos_id: int, pad_id: int) -> transformers.LlamaConfig:
    """LlamaConfig (fp32, no biases, silu) describing the same network as cfg."""
    from transformers import LlamaConfig

    return LlamaConfig(**_gqa_kwargs(cfg, bos_id, eos_id, pad_id), head_dim=cfg.head_dim, attention_bias=False,
                       mlp_bias=False)  # fmt: skip


def hf_gqa_config(cfg: ModelConfig, family: str, *, bos_id: int, eos_id: int, pad_id: int):
    """The transformers config of a GQA family (see `hf_architecture`) describing cfg."""
    import transformers

    if family == "LlamaForCausalLM":
        return hf_llama_config(cfg, bos_id=bos_id, eos_id=eos_id, pad_id=pad_id)
    kw = _gqa_kwargs(cfg, bos_id, eos_id, pad_id)
    if family == "MistralForCausalLM":
        return transformers.MistralConfig(**kw, head_dim=cfg.head_dim, sliding_window=cfg.sliding_window)
    if family == "Qwen3ForCausalLM":
        return transformers.Qwen3Config(**kw, head_dim=cfg.head_dim, attention_bias=False, use_sliding_window=False)
    config = transformers.Qwen2Config(**kw, use_sliding_window=False)
    config.head_dim = cfg.head_dim  # Qwen2 reads an explicit head_dim when present, else hidden / heads
    return config


def hf_architecture(cfg: ModelConfig) -> str:
    """The transformers class that represents cfg (its `hf_architecture` label when set), or ValueError."""
    if cfg.attention == "mla":
        return "DeepseekV3ForCausalLM"
    if cfg.moe.enabled:
        raise ValueError(
            "export of model.attention=gqa with model.moe.enabled=true is not supported: transformers' "
            "DeepseekV3ForCausalLM needs MLA (model.attention=mla); a dense GQA model exports as LlamaForCausalLM"
        )
    fits = {
        "LlamaForCausalLM": not cfg.qkv_bias and not cfg.qk_norm and cfg.sliding_window is None,
        "MistralForCausalLM": not cfg.qkv_bias and not cfg.qk_norm,
        "Qwen2ForCausalLM": not cfg.qk_norm,
        "Qwen3ForCausalLM": not cfg.qkv_bias and cfg.sliding_window is None,
    }
    if cfg.hf_architecture:
        if not fits.get(cfg.hf_architecture, False):
            raise ValueError(
                f"model.hf_architecture={cfg.hf_architecture!r} cannot represent this model (qkv_bias="
                f"{cfg.qkv_bias}, qk_norm={cfg.qk_norm}, sliding_window={cfg.sliding_window}); choose one of "
                f"{[k for k, ok in fits.items() if ok]} or leave it empty"
            )
        return cfg.hf_architecture
    if cfg.qk_norm:
        return "Qwen3ForCausalLM"
    if cfg.qkv_bias:
        return "Qwen2ForCausalLM"
    return "MistralForCausalLM" if cfg.sliding_window is not None else "LlamaForCausalLM"


def hf_deepseek_config(cfg: ModelConfig, *, bos_id: int, eos_id: int, pad_id: int) -> transformers.DeepseekV3Config:
    """DeepseekV3Config (fp32, non-interleaved RoPE, sigmoid routing normalised over the top-k) describing cfg."""
    from transformers import DeepseekV3Config

    check_ids(cfg, bos_id, eos_id, pad_id)
    m = cfg.moe
    return DeepseekV3Config(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.d_model,
        intermediate_size=cfg.ffn_hidden,
        moe_intermediate_size=m.ffn_hidden,
        num_hidden_layers=cfg.n_layers,
        num_attention_heads=cfg.n_heads,
        num_key_value_heads=cfg.n_heads,
        n_shared_experts=m.n_shared_experts,
        n_routed_experts=m.n_routed_experts,
        routed_scaling_factor=m.route_scale,
        kv_lora_rank=cfg.kv_lora_rank,
        q_lora_rank=cfg.q_lora_rank,
        qk_rope_head_dim=cfg.qk_rope_head_dim,
        v_head_dim=cfg.v_head_dim,
        qk_nope_head_dim=cfg.qk_nope_head_dim,
        n_group=m.n_group,
        topk_group=m.topk_group,
        num_experts_per_tok=m.top_k,
        # A dense model is all "first dense" layers.
        first_k_dense_replace=m.first_k_dense if m.enabled else cfg.n_layers,
        norm_topk_prob=True,
        hidden_act="silu",
        max_position_embeddings=cfg.max_seq_len,
        initializer_range=cfg.init_std,
        rms_norm_eps=cfg.norm_eps,
        rope_parameters={"rope_type": "default", "rope_theta": float(cfg.rope_theta)},
        rope_interleave=False,  # we rotate (first half, second half) pairs, as Llama
        attention_bias=False,
        attention_dropout=0.0,
        tie_word_embeddings=cfg.tie_embeddings,
        num_mtp_layers=0,  # MTP is training-only: its weights are not exported
        bos_token_id=bos_id,
        eos_token_id=eos_id,
        pad_token_id=pad_id,
        dtype="float32",
    )


def check_ids(cfg: ModelConfig, bos_id: int, eos_id: int, pad_id: int) -> None:
    if cfg.vocab_size <= 0:
        raise ValueError(f"model.vocab_size={cfg.vocab_size}: set it before exporting")
    for key, value in (("bos_id", bos_id), ("eos_id", eos_id), ("pad_id", pad_id)):
        # A SentencePiece "disabled" id of -1 would silently become padding_idx = vocab_size - 1 in HF.
        if not 0 <= value < cfg.vocab_size:
            raise ValueError(f"{key}={value} is not a token id of a {cfg.vocab_size}-token vocabulary")


def hf_config(cfg: ModelConfig, *, bos_id: int, eos_id: int, pad_id: int):
    """The transformers config of cfg's family."""
    family = hf_architecture(cfg)
    if family == "DeepseekV3ForCausalLM":
        return hf_deepseek_config(cfg, bos_id=bos_id, eos_id=eos_id, pad_id=pad_id)
    return hf_gqa_config(cfg, family, bos_id=bos_id, eos_id=eos_id, pad_id=pad_id)


def to_hf_state_dict(sd: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Our names -> HF names (`model.` prefix except lm_head); lm_head.weight dropped when tied, `mtp.*` dropped.

    The names are already HF's (Llama, or DeepseekV3 with fused `experts.gate_up_proj` / `experts.down_proj`);
    a MoE with no shared expert gets HF's zero-width shared-expert weights."""
    out = {}
    for name, tensor in sd.items():
        if name.startswith("mtp."):
            continue
        if name != "lm_head.weight" or not cfg.tie_embeddings:
            out[hf_key(name)] = tensor
    if cfg.moe.enabled and not cfg.moe.n_shared_experts:
        d = cfg.d_model
        for i in range(cfg.moe.first_k_dense, cfg.n_layers):
            p = f"model.layers.{i}.mlp.shared_experts"
            out[f"{p}.gate_proj.weight"] = out[f"{p}.up_proj.weight"] = torch.zeros(0, d)
            out[f"{p}.down_proj.weight"] = torch.zeros(d, 0)
    return out


def save_hf_model(
    out_dir: str | os.PathLike, sd: dict[str, torch.Tensor], cfg: ModelConfig, *, bos_id: int, eos_id: int, pad_id: int
) -> None:
    """Write config.json, generation_config.json and model.safetensors (fp32) for `from_pretrained(out_dir)`."""
    import transformers
    from transformers import GenerationConfig

    config = hf_config(cfg, bos_id=bos_id, eos_id=eos_id, pad_id=pad_id)
    hf_sd = to_hf_state_dict(sd, cfg)
    if cfg.tie_embeddings:
        # LlamaForCausalLM.state_dict() lists the tied lm_head too; give it the same tensor so strict loading
        # checks every other name. save_pretrained writes the shared tensor once.
        hf_sd["lm_head.weight"] = hf_sd["model.embed_tokens.weight"]
    with torch.device("meta"):
        # Skip the random init of a model that is fully overwritten next.
        model = getattr(transformers, hf_architecture(cfg))(config)
    model.load_state_dict({k: v.detach().to("cpu", torch.float32) for k, v in hf_sd.items()}, strict=True, assign=True)
    if cfg.tie_embeddings:
        model.tie_weights()  # assign=True replaced both Parameters; make them one again
    model.generation_config = GenerationConfig(bos_token_id=bos_id, eos_token_id=eos_id, pad_token_id=pad_id)
    model.save_pretrained(out_dir, safe_serialization=True)


# ---------------------------------------------------------------------------------------------------------------
# Import


def hf_key(name: str) -> str:
    """Our parameter name -> HF's (transformers' in-memory layout): `model.` prefixed, except `lm_head`."""
    return name if name == "lm_head.weight" else f"model.{name}"


def read_hf_config(hf_dir: str | os.PathLike) -> dict:
    """HF_DIR/config.json as a dict, or FileNotFoundError naming it."""
    path = Path(hf_dir) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: init.from_hf needs a local Hugging Face model directory "
                                "(config.json, model.safetensors or its index, tokenizer files)")  # fmt: skip
    return json.loads(path.read_text())


def hf_architecture_of(raw: dict, where: str) -> str:
    """The supported architecture a config.json names, or ValueError naming the one it has."""
    archs = raw.get("architectures") or [None]
    if archs[0] not in FAMILIES:
        raise ValueError(
            f"{where}: architecture {archs[0]!r} (model_type {raw.get('model_type')!r}) is not supported by "
            f"init.from_hf; supported: {', '.join(FAMILIES)}"
        )
    return archs[0]


def _refuse(where: str, what: str) -> None:
    raise ValueError(f"{where}: {what} is not supported by init.from_hf")


def model_config_from_hf(hf_dir: str | os.PathLike, **keep) -> ModelConfig:
    """The ModelConfig of HF_DIR's config.json; `keep` sets fields HF does not describe (doc_masking, eos_id...).

    Refuses, naming it, anything our model would compute differently: RoPE scaling, biases other than Qwen2's,
    activations other than SiLU, active sliding windows except Mistral's (then max_seq_len is capped to it)."""
    import transformers

    where = str(hf_dir)
    arch = hf_architecture_of(read_hf_config(hf_dir), where)
    c = transformers.AutoConfig.from_pretrained(hf_dir, local_files_only=True)
    rope = dict(c.rope_parameters or {})
    if rope.get("rope_type", "default") != "default":
        _refuse(where, f"RoPE scaling rope_type={rope.get('rope_type')!r} (only plain RoPE, rope_type default)")
    if getattr(c, "hidden_act", "silu") != "silu":
        _refuse(where, f"hidden_act={c.hidden_act!r} (SwiGLU with silu only)")
    if getattr(c, "mlp_bias", False):
        _refuse(where, "mlp_bias=true")
    common = dict(vocab_size=c.vocab_size, d_model=c.hidden_size, n_layers=c.num_hidden_layers,
                  n_heads=c.num_attention_heads, ffn_hidden=c.intermediate_size, max_seq_len=c.max_position_embeddings,
                  rope_theta=float(rope.get("rope_theta", 10000.0)), norm_eps=c.rms_norm_eps,
                  tie_embeddings=bool(c.tie_word_embeddings), init_std=c.initializer_range,
                  hf_architecture=arch)  # fmt: skip
    common.update(keep)
    if arch == "DeepseekV3ForCausalLM":
        if getattr(c, "attention_bias", False):
            _refuse(where, "attention_bias=true")
        if not c.norm_topk_prob:
            _refuse(where, "norm_topk_prob=false (gates are normalised over the selected experts here)")
        moe_on = bool(c.n_routed_experts) and c.first_k_dense_replace < c.num_hidden_layers
        moe = MoEConfig()
        if moe_on:
            moe = MoEConfig(enabled=True, n_routed_experts=c.n_routed_experts, n_shared_experts=c.n_shared_experts or 0,
                            top_k=c.num_experts_per_tok, ffn_hidden=c.moe_intermediate_size,
                            first_k_dense=c.first_k_dense_replace, n_group=c.n_group or 1, topk_group=c.topk_group or 1,
                            route_scale=float(c.routed_scaling_factor))  # fmt: skip
        return ModelConfig(**common, n_kv_heads=c.num_attention_heads, attention="mla", q_lora_rank=c.q_lora_rank,
                           kv_lora_rank=c.kv_lora_rank, qk_nope_head_dim=c.qk_nope_head_dim,
                           qk_rope_head_dim=c.qk_rope_head_dim, v_head_dim=c.v_head_dim, moe=moe)  # fmt: skip
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    plain = c.hidden_size % c.num_attention_heads == 0 and head_dim == c.hidden_size // c.num_attention_heads
    if arch != "Qwen2ForCausalLM" and getattr(c, "attention_bias", False):
        _refuse(where, f"attention_bias=true for {arch}")
    sliding = None
    if arch == "MistralForCausalLM" and c.sliding_window is not None:
        sliding = c.sliding_window
        common["max_seq_len"] = min(common["max_seq_len"], sliding)
    elif getattr(c, "use_sliding_window", False) and "sliding_attention" in (getattr(c, "layer_types", None) or []):
        _refuse(where, "sliding-window attention (use_sliding_window=true)")
    return ModelConfig(**common, n_kv_heads=c.num_key_value_heads, head_dim_override=None if plain else head_dim,
                       qkv_bias=arch == "Qwen2ForCausalLM", qk_norm=arch == "Qwen3ForCausalLM",
                       sliding_window=sliding)  # fmt: skip


class HFWeights:
    """The tensors of an HF safetensors checkpoint (one file or a sharded index), read lazily by name and rows."""

    def __init__(self, hf_dir: str | os.PathLike) -> None:
        self.dir = Path(hf_dir)
        index, single = self.dir / "model.safetensors.index.json", self.dir / "model.safetensors"
        if index.is_file():
            self.where = {k: self.dir / f for k, f in json.loads(index.read_text())["weight_map"].items()}
        elif single.is_file():
            from safetensors import safe_open

            with safe_open(single, framework="pt") as f:
                self.where = dict.fromkeys(f.keys(), single)
        else:
            raise FileNotFoundError(
                f"{self.dir} has neither model.safetensors nor model.safetensors.index.json: init.from_hf reads "
                "safetensors weights (re-save a .bin checkpoint with save_pretrained(safe_serialization=True))"
            )
        self._open: dict[Path, object] = {}

    def keys(self) -> set[str]:
        return set(self.where)

    def close(self) -> None:
        """Unmap the files read so far (the next read maps them again). safetensors reads through mmap, and the
        file pages a read touches stay in this process's resident memory while the file is mapped: closing after
        each tensor keeps at most one tensor's pages resident beside the model."""
        self._open.clear()

    def _slice(self, key: str):
        from safetensors import safe_open

        if key not in self.where:
            raise ValueError(f"{self.dir}: tensor {key!r} not found in the checkpoint")
        path = self.where[key]
        if path not in self._open:
            if not path.is_file():
                raise FileNotFoundError(f"{path} not found: {self.dir}'s index names it; the download is incomplete")
            self._open[path] = safe_open(path, framework="pt")
        return self._open[path].get_slice(key)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._slice(key).get_shape())

    def rows(self, key: str, start: int, stop: int) -> torch.Tensor:
        """Rows [start, stop) along dim 0 (elements of a 1-D tensor), read without loading the rest."""
        return self._slice(key)[start:stop]

    def cols(self, key: str, start: int, stop: int) -> torch.Tensor:
        """Columns [start, stop) along dim 1 of a 2-D tensor, read without loading the rest."""
        return self._slice(key)[:, start:stop]


class Source:
    """Where one of our parameters lies in an HF checkpoint: `rows(a, b)` gives its rows [a, b) along dim 0,
    `part(dim, a, b)` its slice [a, b) along dim (a tensor-parallel shard)."""

    shape: tuple[int, ...]
    keys: tuple[str, ...]
    w: HFWeights

    def rows(self, start: int, stop: int) -> torch.Tensor:
        raise NotImplementedError

    def part(self, dim: int, start: int, stop: int) -> torch.Tensor:
        if dim == 0:
            return self.rows(start, stop)
        raise NotImplementedError(f"{type(self).__name__} of {self.keys[0]}: slices along dim {dim}")


class Rows(Source):
    """One HF tensor, optionally with its dim-0 rows permuted (ours[i] = theirs[perm[i]])."""

    def __init__(self, w: HFWeights, key: str, perm: torch.Tensor | None = None) -> None:
        self.w, self.key, self.perm = w, key, perm
        self.shape, self.keys = w.shape(key), (key,)

    def rows(self, start: int, stop: int) -> torch.Tensor:
        if self.perm is None:
            return self.w.rows(self.key, start, stop)
        idx = self.perm[start:stop]
        lo, hi = int(idx.min()), int(idx.max()) + 1  # a permutation within heads: a small window around [a, b)
        return self.w.rows(self.key, lo, hi)[idx - lo]

    def part(self, dim: int, start: int, stop: int) -> torch.Tensor:
        if dim == 1 and len(self.shape) == 2:
            cols = self.w.cols(self.key, start, stop)
            return cols if self.perm is None else cols[self.perm]
        return super().part(dim, start, stop)


class Stacked(Source):
    """Our fused experts (E, ...) from HF's per-expert tensors: row e = cat of `parts[e]` along dim 0."""

    def __init__(self, w: HFWeights, parts: list[tuple[str, ...]]) -> None:
        self.w, self.parts = w, parts
        first = [w.shape(k) for k in parts[0]]
        self.shape = (len(parts), sum(s[0] for s in first), *first[0][1:])
        self.keys = tuple(k for p in parts for k in p)

    def rows(self, start: int, stop: int) -> torch.Tensor:
        return torch.stack([torch.cat([self.w.rows(k, 0, self.w.shape(k)[0]) for k in self.parts[e]])
                            for e in range(start, stop)])  # fmt: skip


class ExtendedRows(Source):
    """An embedding or output head grown by a vocabulary extension: base rows unchanged, new row i the mean of
    the base rows `new[i]` (the new piece's tokenization by the base tokenizer), rows past those (padding to a
    multiple of 128) the mean of all base rows."""

    CHUNK = 8192

    def __init__(self, base: Source, new: list[list[int]], vocab_size: int) -> None:
        self.base, self.new, self.w = base, new, base.w
        self.n_base = base.shape[0]
        if self.n_base + len(new) > vocab_size:
            raise ValueError(f"{self.n_base} base rows + {len(new)} new pieces exceed model.vocab_size={vocab_size}")
        for ids in new:
            if not ids or min(ids) < 0 or max(ids) >= self.n_base:
                raise ValueError(f"a new piece's base tokenization {ids} is not made of base ids [0, {self.n_base})")
        self.shape, self.keys = (vocab_size, *base.shape[1:]), base.keys
        self._mean: torch.Tensor | None = None

    def _base_mean(self) -> torch.Tensor:
        if self._mean is None:  # chunked, so even a 150k x 8k head never sits in memory whole
            total = torch.zeros(self.shape[1:], dtype=torch.float64)
            for a in range(0, self.n_base, self.CHUNK):
                total += self.base.rows(a, min(a + self.CHUNK, self.n_base)).double().sum(0)
            self._mean = (total / self.n_base).float()
        return self._mean

    def rows(self, start: int, stop: int) -> torch.Tensor:
        out = []
        if start < self.n_base:
            out.append(self.base.rows(start, min(stop, self.n_base)).float())
        for i in range(max(start, self.n_base), stop):
            j = i - self.n_base
            if j < len(self.new):
                out.append(
                    torch.stack([self.base.rows(t, t + 1)[0].float() for t in self.new[j]]).mean(0, keepdim=True)
                )
            else:
                out.append(self._base_mean()[None])
        return torch.cat(out)


def _interleave_perm(n_heads: int, nope: int, rope: int, offset: int = 0) -> torch.Tensor:
    """Rows of q (heads of [nope, rope]) or of kv_a (offset + rope) taking DeepSeek's interleaved RoPE pairs
    (x0, x1), (x2, x3)... to the (first half, second half) layout our RoPE rotates: ours[j] = theirs[perm[j]]."""
    halves = torch.cat((torch.arange(0, rope, 2), torch.arange(1, rope, 2)))
    if n_heads == 0:
        return torch.cat((torch.arange(offset), offset + halves))
    per = nope + rope
    return torch.cat([torch.cat((h * per + torch.arange(nope), h * per + nope + halves)) for h in range(n_heads)])


def hf_sources(
    cfg: ModelConfig,
    w: HFWeights,
    *,
    layer_map: list[int] | None = None,
    new_rows: list[list[int]] | None = None,
    rope_interleave: bool = False,
) -> dict[str, Source]:
    """For each parameter and persistent buffer of `Transformer(cfg)` (tied lm_head and MTP excluded), its HF source.

    layer_map[i] is the base layer our layer i is read from (depth up-scaling; default the identity); new_rows
    lists, for each token appended to the base vocabulary, its base tokenization (vocabulary extension). Refuses
    a shape that differs, a tensor that is missing, and (without layer_map) tensors of the checkpoint left unused."""
    from model.transformer import Transformer

    with torch.device("meta"):
        ours = {k: tuple(v.shape) for k, v in Transformer(cfg, random_init=False).state_dict().items()}
    layer_map = list(range(cfg.n_layers)) if layer_map is None else layer_map
    out: dict[str, Source] = {}
    for name, shape in ours.items():
        if name.startswith("mtp.") or (name == "lm_head.weight" and cfg.tie_embeddings):
            continue
        m = re.fullmatch(r"layers\.(\d+)\.(.+)", name)
        key = f"model.layers.{layer_map[int(m[1])]}.{m[2]}" if m else hf_key(name)
        src: Source
        if m and m[2].startswith("mlp.experts.") and key not in w.where:
            layer = key.rsplit(".", 1)[0]
            names = ("gate_proj", "up_proj") if m[2].endswith("gate_up_proj") else ("down_proj",)
            src = Stacked(w, [tuple(f"{layer}.{e}.{n}.weight" for n in names) for e in range(shape[0])])
        elif rope_interleave and m and m[2] in ("self_attn.q_proj.weight", "self_attn.q_b_proj.weight"):
            src = Rows(w, key, _interleave_perm(cfg.n_heads, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim))
        elif rope_interleave and m and m[2] == "self_attn.kv_a_proj_with_mqa.weight":
            src = Rows(w, key, _interleave_perm(0, 0, cfg.qk_rope_head_dim, cfg.kv_lora_rank))
        else:
            src = Rows(w, key)
        if new_rows is not None and name in ("embed_tokens.weight", "lm_head.weight"):
            src = ExtendedRows(src, new_rows, cfg.vocab_size)
        if src.shape != shape:
            raise ValueError(
                f"{w.dir}: {src.keys[0]} has shape {list(src.shape)} but the model derived from config.json needs "
                f"{list(shape)} for {name}" + (" (the tokenizer's vocabulary does not match the weights)"
                                               if name in ("embed_tokens.weight", "lm_head.weight") else "")
            )  # fmt: skip
        out[name] = src
    used = {k for s in out.values() for k in s.keys}
    read_layers = {str(j) for j in layer_map}
    unused = sorted(
        k for k in w.keys() - used
        if not k.endswith("rotary_emb.inv_freq")
        and not ((lm := re.match(r"model\.layers\.(\d+)\.", k)) and lm[1] not in read_layers)
        and not (k == "lm_head.weight" and cfg.tie_embeddings)
    )  # fmt: skip
    if unused:
        raise ValueError(
            f"{w.dir}: tensors the derived model has no place for: {unused[:5]}"
            f"{' ...' if len(unused) > 5 else ''} (an architecture option init.from_hf does not know)"
        )
    return out


def load_hf_state_dict(sources: dict[str, Source]) -> dict[str, torch.Tensor]:
    """Every source read whole (single-process loading; ZeRO-3 and tensor parallelism read only each rank's
    slices instead)."""
    return {name: src.rows(0, src.shape[0]) for name, src in sources.items()}


def part_reader(sources: dict[str, Source]) -> Callable[[str, int, int, int], torch.Tensor]:
    """read(name, dim, a, b): our parameter `name` restricted to [a, b) along dim, reading only that slice."""

    def read(name: str, dim: int, start: int, stop: int) -> torch.Tensor:
        src = sources[name]
        try:
            return src.part(dim, start, stop)
        finally:
            src.w.close()

    return read


def flat_reader(sources: dict[str, Source]) -> Callable[[str, int, int], torch.Tensor]:
    """read(name, a, b): elements [a, b) of our parameter `name` flattened, reading only the rows they span."""

    def read(name: str, start: int, stop: int) -> torch.Tensor:
        src = sources[name]
        per_row = 1
        for d in src.shape[1:]:
            per_row *= d
        r0, r1 = start // per_row, -(-stop // per_row)
        try:
            return src.rows(r0, r1).reshape(-1)[start - r0 * per_row : stop - r0 * per_row]
        finally:
            src.w.close()

    return read
