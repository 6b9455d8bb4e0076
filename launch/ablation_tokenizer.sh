#!/usr/bin/env bash
# Tokenizer ablation by model quality at equal training FLOPs (BENCHMARKS.md, issue 18).
#   bash launch/ablation_tokenizer.sh [OUT_DIR=runs/ablation_tok] [BASE_STEPS=120] [EVAL_SEQUENCES=100000]
# PARALLEL=1 trains the four models at once (one thread each).
# Tokenizers: ko64k as shipped (pieces may span spaces), ko64k with SentencePiece's default splits, Polyglot-Ko's
# tokenizer.json (../shared/reference_tokenizers/polyglot-ko, through tokenizer.hf_tokenizer:load_any), ko128k.
# Each prepares configs/data/ablation_tok.yaml with its tokenizer and trains the same small model; steps =
# BASE_STEPS * FLOPs/token(ko64k) / FLOPs/token(variant) (the output head grows with the vocabulary), so every run
# spends the same training FLOPs. Compare final val_bpb / val_bpb/SOURCE (train.report ranks by it).
set -euo pipefail
OUT=${1:-runs/ablation_tok}
BASE_STEPS=${2:-120}
EVAL_SEQUENCES=${3:-100000}
PARALLEL=${PARALLEL:-0}
PY=${PY:-.venv/bin/python}
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1
mkdir -p "$OUT"
SP=tokenizer.tokenizer:Tokenizer.from_dir
HF=tokenizer.hf_tokenizer:load_any
declare -A TOK=(
  [ko64k]="tokenizer=ko64k"
  [ko64k_default_splits]="tokenizer=ko64k tokenizer.split_by_whitespace=true tokenizer.split_by_script=true"
  [ko128k]="tokenizer=ko128k"
)
declare -A TOKDIR=([ko64k]="$OUT/tok/ko64k" [ko64k_default_splits]="$OUT/tok/ko64k_default_splits"
                   [polyglot_ko]="../shared/reference_tokenizers/polyglot-ko" [ko128k]="$OUT/tok/ko128k")
declare -A LOADER=([ko64k]=$SP [ko64k_default_splits]=$SP [polyglot_ko]=$HF [ko128k]=$SP)
MODEL="model=nano model.d_model=64 model.n_layers=4 model.n_heads=4 model.n_kv_heads=2 model.ffn_hidden=192"
SEQ=128
flops() {  # FLOPs/token of the ablation model with the vocabulary of tokenizer $1 (loader $2)
  $PY - "$1" "$2" <<'PYEOF'
import dataclasses, sys
from data_pipeline.config import TokenizerRef
from data_pipeline.text_tokenizer import load_tokenizer
from model.config import ModelConfig
from model.flops import flops_per_token
tok = load_tokenizer(TokenizerRef(sys.argv[1], sys.argv[2]))
cfg = ModelConfig(vocab_size=tok.vocab_size, d_model=64, n_layers=4, n_heads=4, n_kv_heads=2, ffn_hidden=192,
                  max_seq_len=256, tie_embeddings=True)
print(flops_per_token(cfg, 128))
PYEOF
}
for name in ko64k ko64k_default_splits polyglot_ko ko128k; do
  dir=${TOKDIR[$name]}
  if [ -n "${TOK[$name]:-}" ] && [ ! -f "$dir/tokenizer.model" ]; then
    echo "=== tokenizer $name"
    $PY -m tokenizer.train ${TOK[$name]} data=shared_all out="$dir" tokenizer.eval_max_chars=0 > "$OUT/tok_$name.log" 2>&1
  fi
  if [ ! -f "$OUT/data/$name/manifest.json" ]; then
    echo "=== prepare $name"
    $PY -m data_pipeline.prepare data=ablation_tok tokenizer.path="$dir" tokenizer.loader=${LOADER[$name]} \
      out="$OUT/data/$name" > "$OUT/prepare_$name.log" 2>&1
  fi
done
base=$(flops "${TOKDIR[ko64k]}" $SP)
train_one() {
  local name=$1 f steps
  f=$(flops "${TOKDIR[$name]}" "${LOADER[$name]}")
  steps=$($PY -c "print(round($BASE_STEPS * $base / $f))")
  echo "=== train $name: $f FLOPs/token, $steps steps"
  rm -rf "$OUT/runs/$name" && mkdir -p "$OUT/runs/$name"
  $PY -m torch.distributed.run --standalone --nproc_per_node 1 -m train.pretrain $MODEL \
    tokenizer.path="${TOKDIR[$name]}" tokenizer.loader=${LOADER[$name]} data.path="$OUT/data/$name" \
    run.dir="$OUT/runs/$name" train.max_steps="$steps" train.seq_len=$SEQ train.global_batch_tokens=2048 \
    train.micro_batch_size=16 train.eval_every=100000 train.eval_sequences=$EVAL_SEQUENCES optim.lr=3e-3 \
    optim.warmup_steps=10 checkpoint.every_steps=0 deepspeed.zero_stage=0 deepspeed.heartbeat=false \
    train.spike.window=0 train.threads_per_rank=$([ "$PARALLEL" = 1 ] && echo 1 || echo 0) \
    logging.wandb.mode=disabled logging.progress=false > "$OUT/train_$name.log" 2>&1
  tail -n 1 "$OUT/runs/$name/metrics.jsonl" > "$OUT/runs/$name/summary.json"
  echo "$f $steps" > "$OUT/runs/$name/flops_steps.txt"
}
for name in ko64k ko64k_default_splits polyglot_ko ko128k; do
  [ -f "$OUT/runs/$name/summary.json" ] && continue
  if [ "$PARALLEL" = 1 ]; then train_one $name & else train_one $name; fi
done
wait
$PY -m train.report "$OUT/runs" out="$OUT/report"
