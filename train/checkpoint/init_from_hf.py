"""`init.from_hf`: start a run from an open model's weights. `plan_hf_init` derives the model config from the HF
directory and checks everything (architecture, files, tensor shapes, tokenizer, depth up-scaling) before any
collective; `build_from_hf` constructs the model and fills it, each rank reading only the slices it holds (its
ZeRO-3 partitions, its tensor-parallel shards)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

from torch import nn

from model.config import ExecutionConfig, ModelConfig
from model.hf import HFWeights, flat_reader, hf_sources, model_config_from_hf, part_reader, read_hf_config
from model.moe import Experts
from model.transformer import Transformer
from train.config import InitConfig
from train.engine import zero_load

VOCAB_MULTIPLE = 128
KEEP = ("name", "doc_masking", "doc_position_reset", "eos_id")
"""Model keys the HF config does not describe: taken from the run's `model` config."""
HASHED_MAX_BYTES = 64 << 20
"""Files up to this size are hashed into meta.json; larger ones (weights) are recorded by size."""


@dataclasses.dataclass
class HFInit:
    """What `plan_hf_init` decided: the model to build and where each of its tensors is read from."""

    dir: str
    model: ModelConfig
    layer_map: list[int] | None
    new_rows: list[list[int]] | None
    rope_interleave: bool
    meta: dict
    """meta.json's `base_model`: path, architecture, config sha256, files, depth up-scaling, vocabulary extension."""

    def sources(self):
        return hf_sources(self.model, HFWeights(self.dir), layer_map=self.layer_map, new_rows=self.new_rows,
                          rope_interleave=self.rope_interleave)  # fmt: skip


def layer_map(ranges: list[list[int]], n_base: int) -> list[int]:
    """[[0, 24], [8, 32]] -> [0..23, 8..31]; refuses a range outside the base's n_base layers."""
    out = []
    for a, b in ranges:
        if b > n_base:
            raise ValueError(f"init.depth_upscale.layers: range [{a}, {b}) exceeds the base model's {n_base} layers")
        out += range(a, b)
    return out


def base_model_meta(hf_dir: Path, arch: str) -> dict:
    files = {}
    for p in sorted(hf_dir.iterdir()):
        if p.is_file():
            size = p.stat().st_size
            files[p.name] = {"size": size}
            if size <= HASHED_MAX_BYTES:
                files[p.name]["sha256"] = hashlib.sha256(p.read_bytes()).hexdigest()
    return {"path": str(hf_dir.resolve()), "architecture": arch,
            "config_sha256": hashlib.sha256((hf_dir / "config.json").read_bytes()).hexdigest(),
            "files": files}  # fmt: skip


def plan_hf_init(init: InitConfig, user_model: ModelConfig, tok, tokenizer_path: str) -> HFInit:
    """The model config and sources of `init.from_hf`, checked against the tokenizer the data was prepared with.

    The tokenizer is the base's (its ids must fit the base's embeddings) or a `tokenizer.extend` of it (its
    recorded base vocabulary must equal the base's embedding rows; new rows are initialised from it)."""
    hf_dir = Path(init.from_hf)
    if not hf_dir.is_dir():
        raise FileNotFoundError(f"init.from_hf={init.from_hf}: no such directory (a local Hugging Face model)")
    raw = read_hf_config(hf_dir)
    keep = {k: getattr(user_model, k) for k in KEEP}
    model = model_config_from_hf(hf_dir, **keep)
    arch = model.hf_architecture
    n_base = model.n_layers
    lmap = None
    if init.depth_upscale.layers:
        lmap = layer_map([list(r) for r in init.depth_upscale.layers], n_base)
        k = model.moe.first_k_dense if model.moe.enabled else 0
        if any((i < k) != (j < k) for i, j in enumerate(lmap)):
            raise ValueError(f"init.depth_upscale.layers: the first {k} layers of {arch} are dense, the rest MoE; "
                             "every new layer must come from a base layer of the same kind")  # fmt: skip
        model = dataclasses.replace(model, n_layers=len(lmap))
    base_vocab = model.vocab_size
    ext = tok.extension() if hasattr(tok, "extension") else None
    new_rows = None
    if ext is not None:
        if ext["base_vocab_size"] != base_vocab:
            raise ValueError(
                f"tokenizer.path={tokenizer_path} extends a base with {ext['base_vocab_size']} embedding rows, but "
                f"init.from_hf={init.from_hf} has {base_vocab}: the vocabulary does not match the weights; extend "
                "this base's tokenizer (python -m tokenizer.extend base=HF_DIR ...)"
            )
        new_rows = [p["base_ids"] for p in ext["added"]]
        model = dataclasses.replace(model, vocab_size=ext["vocab_size"])
    elif tok.vocab_size > base_vocab:
        raise ValueError(
            f"tokenizer.path={tokenizer_path} has {tok.vocab_size} tokens but init.from_hf={init.from_hf} has "
            f"{base_vocab} embedding rows: the vocabulary does not match the weights. Use the base's tokenizer, or "
            "extend it with python -m tokenizer.extend base=HF_DIR add=TOKDIR out=DIR"
        )
    info = HFInit(str(hf_dir), model, lmap, new_rows, bool(raw.get("rope_interleave", False)) and
                  model.attention == "mla", {})  # fmt: skip
    info.sources()  # every tensor present with the right shape, nothing left over: fail before any collective
    info.meta = {**base_model_meta(hf_dir, arch), "depth_upscale": init.depth_upscale.layers and
                 [list(r) for r in init.depth_upscale.layers],
                 "vocab_extension": None if ext is None else {"base_vocab_size": base_vocab, "added": len(new_rows),
                                                              "vocab_size": model.vocab_size}}  # fmt: skip
    return info


def build_from_hf(info: HFInit, execution: ExecutionConfig, dispatcher, ds_config: dict | None,
                  seq_shard=None, tp_size: int = 1) -> nn.Module:  # fmt: skip
    """The model of `info` filled with the HF weights; ds_config (ZeRO-3 jobs) builds it partitioned, each rank
    reading only its partitions' rows. Expert-parallel ranks read only their experts. tp_size > 1 returns it
    already sharded by AutoTP, each rank having read only the rows or columns of its shards and the replicated
    tensors; ds_config is then unused (under ZeRO-3, deepspeed.initialize partitions those shards further over the
    data-parallel ranks, as for a randomly initialised tensor-parallel model)."""
    module = zero_load.construct(
        lambda: Transformer(info.model, execution, dispatcher, seq_shard, random_init=False), ds_config, tp_size
    )
    if tp_size > 1:
        zero_load.load_tensor_parallel(module, part_reader(info.sources()))
        return module
    read = flat_reader(info.sources())
    offsets = {}
    for mname, m in module.named_modules():
        if isinstance(m, Experts) and m.expert_offset:
            for pname, p in m.named_parameters(recurse=False):
                offsets[f"{mname}.{pname}"] = m.expert_offset * p[0].numel()

    def read_local(name: str, a: int, b: int):
        off = offsets.get(name, 0)
        return read(name, a + off, b + off)

    zero_load.load_parameters(module, read_local)
    return module


def describe(info: HFInit) -> str:
    return json.dumps({"from_hf": info.dir, "architecture": info.model.hf_architecture, "layers": info.model.n_layers,
                       "vocab_size": info.model.vocab_size})  # fmt: skip
