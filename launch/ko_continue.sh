#!/usr/bin/env bash
# Continued pretraining recipe (experiment=ko_continue) on the repo's sample, CPU, a few minutes:
# a tiny Llama base made locally with an English-only tokenizer, extended with Korean pieces, trained, exported.
#   bash launch/ko_continue.sh [OUT_DIR=runs/ko_continue] [NPROC=2]
set -euo pipefail
OUT=${1:-runs/ko_continue}
NPROC=${2:-2}
PY=${PY:-.venv/bin/python}
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1
rm -rf "$OUT"
EVAL=data/eval/kowiki_heldout.txt,data/eval/nsmc_heldout.txt
$PY -m tokenizer.train tokenizer=ko8k tokenizer.vocab_size=1024 data=en_sample out="$OUT/base_tokenizer"
$PY -m tokenizer.train tokenizer=ko8k data=ko_sample out="$OUT/ko_tokenizer"
$PY -m launch.make_tiny_base out="$OUT/base" family=LlamaForCausalLM tokenizer="$OUT/base_tokenizer"
$PY -m tokenizer.extend base="$OUT/base" add="$OUT/ko_tokenizer" out="$OUT/tokenizer_ext" max_added=4096 \
  eval_files="$EVAL" | tee "$OUT/extend.json"
$PY -m data_pipeline.prepare data=ko_sample tokenizer.path="$OUT/tokenizer_ext" \
  tokenizer.loader=tokenizer.hf_tokenizer:load_any out="$OUT/data"
$PY -m torch.distributed.run --nproc_per_node "$NPROC" -m train.pretrain experiment=ko_continue \
  init.from_hf="$OUT/base" tokenizer.path="$OUT/tokenizer_ext" data.path="$OUT/data" run.dir="$OUT/run" \
  logging.wandb.mode=disabled | tail -n 1 | tee "$OUT/train.json"
$PY -m train.export run.dir="$OUT/run" out="$OUT/hf"
# Validation bits per byte: val_loss (nats per token) x tokens per UTF-8 byte of the decoded validation split.
$PY - "$OUT" <<'PY' | tee "$OUT/bpb.json"
import json, math, sys
from pathlib import Path
import numpy as np
from tokenizer.hf_tokenizer import load_any
out = Path(sys.argv[1])
run = json.loads((out / "train.json").read_text())
m = json.loads((out / "data" / "manifest.json").read_text())
tok = load_any(out / "tokenizer_ext")
ids = np.concatenate([np.fromfile(out / "data" / s["file"], dtype=m["dtype"]) for s in m["splits"]["val"]["shards"]])
tpb = len(ids) / len(tok.decode(ids.tolist()).encode())
print(json.dumps({"val_loss_first": run["first_val_loss"], "val_loss_last": run["val_loss"], "tokens_per_byte": tpb,
                  "val_bpb_first": run["first_val_loss"] * tpb / math.log(2),
                  "val_bpb_last": run["val_loss"] * tpb / math.log(2)}))
PY
