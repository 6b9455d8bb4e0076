#!/usr/bin/env bash
# Muon vs AdamW ablation (BENCHMARKS.md, issue 17) on the repo's Korean sample: same model, data and data order;
# AdamW and Muon at three learning rates each, one run after another; then train.report's loss-vs-tokens plots.
#   bash launch/ablation_muon.sh [OUT_DIR=runs/ablation_muon] [STEPS=500] [MODEL=nano]
set -euo pipefail
OUT=${1:-runs/ablation_muon}
STEPS=${2:-500}
MODEL=${3:-nano}
PY=${PY:-.venv/bin/python}
LRS=${LRS:-"1e-3 3e-3 1e-2"}
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1
mkdir -p "$OUT/sweep"
if [ ! -f "$OUT/data/manifest.json" ]; then
  $PY -m tokenizer.train tokenizer=ko8k data=ko_sample out="$OUT/tokenizer"
  $PY -m data_pipeline.prepare data=ko_sample tokenizer.path="$OUT/tokenizer" out="$OUT/data"
fi
for opt in adamw muon; do
  for lr in $LRS; do
    run="$OUT/sweep/${opt}_lr${lr}"
    [ -f "$run/metrics.jsonl" ] && grep -q "\"step\": $STEPS,.*val_loss" "$run/metrics.jsonl" && continue
    rm -rf "$run"
    nice -n 5 $PY -m torch.distributed.run --standalone --nproc_per_node=1 -m train.pretrain \
      experiment=ko_tiny model="$MODEL" optim="$opt" optim.lr="$lr" optim.warmup_steps=$((STEPS / 20)) \
      tokenizer.path="$OUT/tokenizer" data.path="$OUT/data" run.dir="$run" \
      train.max_steps="$STEPS" train.seq_len=128 train.global_batch_tokens=1024 train.micro_batch_size=8 \
      train.threads_per_rank=1 train.eval_every=$((STEPS / 10)) train.eval_sequences=32 deepspeed=zero0 \
      checkpoint.every_steps=0 logging.wandb.mode=disabled logging.progress=false > "$run.log" 2>&1
  done
done
$PY -m train.report "$OUT/sweep" out="$OUT/report"
