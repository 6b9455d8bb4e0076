#!/usr/bin/env bash
# DeepSeek-style architecture ablation at equal training FLOPs (BENCHMARKS.md, issue 5), on the repo's Korean sample.
#   bash launch/ablation_deepseek.sh [OUT_DIR=runs/ablation_ds] [BASE_STEPS=60]
# Every variant trains on 1024-token steps (8 x 128) with the same data order; steps = BASE_STEPS * (FLOPs/token of the dense
# GQA baseline) / (FLOPs/token of the variant), so every run spends the same training FLOPs.
set -euo pipefail
OUT=${1:-runs/ablation_ds}
BASE_STEPS=${2:-60}
PY=${PY:-.venv/bin/python}
NPROC=${NPROC:-1}
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1
mkdir -p "$OUT"
if [ ! -f "$OUT/data/manifest.json" ]; then
  $PY -m tokenizer.train tokenizer=ko8k data=ko_sample out="$OUT/tokenizer"
  $PY -m data_pipeline.prepare data=ko_sample tokenizer.path="$OUT/tokenizer" out="$OUT/data"
fi
declare -A VARIANTS=(
  [dense_gqa]="model.attention=gqa model.n_kv_heads=2 model.moe.enabled=false model.mtp.depth=0"
  [dense_mla]="model.attention=mla model.moe.enabled=false model.mtp.depth=0"
  [moe_auxfree]="model.attention=mla model.moe.enabled=true train.moe.balance=aux_free model.mtp.depth=0"
  [moe_auxloss]="model.attention=mla model.moe.enabled=true train.moe.balance=aux_loss model.mtp.depth=0"
  [moe_auxfree_mtp]="model.attention=mla model.moe.enabled=true train.moe.balance=aux_free model.mtp.depth=1"
  [moe_auxfree_g1e-2]="model.attention=mla model.moe.enabled=true train.moe.balance=aux_free train.moe.gamma=0.01 model.mtp.depth=0"
)
SEQ=128
flops() {  # FLOPs/token of model=deepseek_tiny with overrides $1 (vocab from the tokenizer)
  $PY - "$1" "$OUT/tokenizer" <<'PYEOF'
import sys
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
import dataclasses, os
import train.config  # noqa: F401
from model.flops import flops_per_token
from tokenizer.tokenizer import Tokenizer
with initialize_config_dir(os.path.abspath("configs"), version_base="1.3"):
    cfg = compose("train", ["model=deepseek_tiny", "run.dir=x", *sys.argv[1].split()])
model = OmegaConf.to_object(cfg).model
model = dataclasses.replace(model, vocab_size=Tokenizer.from_dir(sys.argv[2]).vocab_size)
print(flops_per_token(model, 128))
PYEOF
}
base=$(flops "${VARIANTS[dense_gqa]}")
for name in dense_gqa dense_mla moe_auxfree moe_auxloss moe_auxfree_g1e-2 moe_auxfree_mtp; do
  [ -f "$OUT/$name/summary.json" ] && continue
  f=$(flops "${VARIANTS[$name]}")
  steps=$($PY -c "print(round($BASE_STEPS * $base / $f))")
  echo "=== $name: $f FLOPs/token, $steps steps"
  rm -rf "$OUT/$name" && mkdir -p "$OUT/$name"
  $PY -m launch.run --standalone --nproc_per_node "$NPROC" -m train.pretrain model=deepseek_tiny \
    ${VARIANTS[$name]} tokenizer.path="$OUT/tokenizer" data.path="$OUT/data" run.dir="$OUT/$name" \
    train.max_steps="$steps" train.seq_len=$SEQ train.global_batch_tokens=1024 train.micro_batch_size=8 train.threads_per_rank=1 \
    train.eval_every=1000 train.eval_sequences=48 optim.lr=3e-3 optim.warmup_steps=6 checkpoint.every_steps=0 \
    deepspeed.zero_stage=2 logging.wandb.mode=disabled logging.progress=false > "$OUT/$name.log" 2>&1
  tail -n 1 "$OUT/$name.log" > "$OUT/$name/summary.json"
  echo "$f $steps" > "$OUT/$name/flops_steps.txt"
done
