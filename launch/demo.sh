#!/usr/bin/env bash
# The demo (`make demo`): every stage of the job on the repo's licensed Korean sample, on CPU or GPU.
#   bash launch/demo.sh [OUT_DIR=runs/ko_tiny] [NPROC=2]
set -euo pipefail
OUT=${1:-runs/ko_tiny}
NPROC=${2:-2}
PY=${PY:-.venv/bin/python}
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1
start=$(date +%s)
step() { echo; echo "=== [$(( $(date +%s) - start ))s] $*"; }

rm -rf "$OUT"
step "1/6 train the tokenizer"
$PY -m tokenizer.train tokenizer=ko8k data=ko_sample out="$OUT/tokenizer"
step "2/6 prepare token shards (licenses checked, bill of materials in manifest.json)"
$PY -m data_pipeline.prepare data=ko_sample tokenizer.path="$OUT/tokenizer" out="$OUT/data"
step "3/6 pretrain with $NPROC processes under DeepSpeed ZeRO-2"
$PY -m launch.run --nproc_per_node "$NPROC" -m train.pretrain experiment=ko_tiny \
  tokenizer.path="$OUT/tokenizer" data.path="$OUT/data" run.dir="$OUT/run" logging.progress=true
step "4/6 evaluate on held-out text"
$PY -m train.evaluate run.dir="$OUT/run" \
  'eval.text_files=[data/eval/kowiki_heldout.txt,data/eval/nsmc_heldout.txt]' | tail -n 1 > "$OUT/eval.json"
step "5/6 export to Hugging Face format"
$PY -m train.export run.dir="$OUT/run" out="$OUT/hf"
step "6/6 summary"
$PY -m train.summary "$OUT/run" "$OUT/hf" "$OUT/eval.json"
echo; echo "demo finished in $(( $(date +%s) - start ))s"
