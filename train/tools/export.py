"""`python -m train.export run.dir=DIR out=HF_DIR`: a run's checkpoint as a Hugging Face model directory
(LlamaForCausalLM for dense GQA models, DeepseekV3ForCausalLM for MLA / DeepSeekMoE models).

Writes config.json, generation_config.json, model.safetensors, the tokenizer files and README.md, the model card
(train/tools/model_card.py; `export.license=ID` sets the weights' license), so that
`AutoModelForCausalLM.from_pretrained(HF_DIR)` and `AutoTokenizer.from_pretrained(HF_DIR)` load it offline.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import hydra
from omegaconf import DictConfig

from data_pipeline.cli import to_object_strict, user_errors
from model.config import ModelConfig
from model.hf import hf_architecture, save_hf_model
from tokenizer.nfc import has_nfc_map
from train.checkpoint.weights import load_full_weights
from train.config import ExportConfig
from train.tools import CONFIGS
from train.tools.model_card import model_card
from train.tools.run_dir import run_config, run_tokenizer

TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def export(run_dir: str, out: str, tag: str | None = None, license: str | None = None) -> dict:
    """Write the run's checkpoint `tag` (latest by default) to `out` as a Hugging Face model with its model card
    (README.md, `license` = the weights' license); returns what was done."""
    state, meta = load_full_weights(Path(run_dir), tag)
    tok, tok_dir = run_tokenizer(run_dir, meta)
    cfg = ModelConfig.from_dict(meta["model"])
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_hf_model(out_dir, state, cfg, bos_id=tok.bos_id, eos_id=tok.eos_id, pad_id=tok.pad_id)
    for name in TOKENIZER_FILES:
        if (tok_dir / name).is_file():
            shutil.copyfile(tok_dir / name, out_dir / name)
    run_cfg = run_config(run_dir)["tokenizer"]
    n_params = sum(t.numel() for name, t in state.items() if not (cfg.tie_embeddings and name == "lm_head.weight"))
    tok_info = {"name": run_cfg.get("name"), "vocab_size": tok.vocab_size, "sha256": tok.sha256,
                "nfc_compiled": has_nfc_map(tok_dir / "tokenizer.model") if (tok_dir / "tokenizer.model").is_file()
                else None}  # fmt: skip
    card = model_card(run_dir, meta, n_params, hf_architecture(cfg), tok_info, license)
    (out_dir / "README.md").write_text(card)
    info = {
        "out": str(out_dir),
        "run_dir": str(run_dir),
        "tag": meta["tag"],
        "step": meta["step"],
        "architecture": hf_architecture(cfg),
        "tokenizer_sha256": tok.sha256,
    }
    (out_dir / "hangang_export.json").write_text(json.dumps(info, indent=2))
    return info


@hydra.main(config_path=CONFIGS, config_name="export", version_base="1.3")
def main(raw: DictConfig) -> None:
    with user_errors():
        cfg: ExportConfig = to_object_strict(raw)
        info = export(cfg.run.dir, cfg.out, cfg.tag, cfg.export.license)
    print(json.dumps(info))


if __name__ == "__main__":
    main()
