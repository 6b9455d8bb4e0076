#!/usr/bin/env bash
# The one-GPU measurements issues 14 and 15 owe, in parts each sized for one 10-minute device call (not yet timed):
#   pairs: on the same GPU, `train.bench` (one process, synthetic tokens) and the real trainer path (`launch.run
#          --nproc_per_node 1 -m train.pretrain`, DeepSpeed ZeRO-1, bf16, compile + fused loss) for llama_1b and
#          deepseek_1b_active; `launch.plan gpus=1` for each; every record against the planner with the shipped preset
#          and with a GEMM curve measured on this GPU (`launch.fit_efficiency curve=true`, written to OUT).
#   long:  the longest sequence the trainer holds on one GPU (llama_1b, micro-batch 1, full activation checkpointing),
#          doubling from 32K tokens, each next to the planner's memory prediction.
#   bash launch/gpu_checks.sh OUT [pairs,long]
# Results: OUT/bench.jsonl, OUT/plan.jsonl, OUT/long.jsonl (one JSON object per line), OUT/planner_check*.txt, logs.
# Needs one CUDA GPU, torch, and the packages of setup.py (`make install DEVICE=cuda`); on a machine that lacks them,
# install wheels of deepspeed, hydra-core, omegaconf, antlr4-python3-runtime, hjson, pydantic (with pydantic-core,
# annotated-types, typing-inspection) and liger-kernel first.
# SMOKE=1 runs the same steps on CPU with tiny shapes (tests/launch/test_gpu_checks.py keeps the script working).
set -euo pipefail
OUT=${1:?usage: bash launch/gpu_checks.sh OUT_DIR [pairs,long]}
PARTS=${2:-pairs,long}
PY=${PY:-python}
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)

if [[ ${SMOKE:-0} == 1 ]]; then
  GPU=cpu SEQ=128 STEPS=3 COMPILE=false LOSS=chunked LONG_MODEL=nano LONG_SEQS="256 512" LONG_TIMEOUT=300
  PAIRS=("tiny 2" "deepseek_tiny 2 model.mtp.depth=0")
else
  # The preset whose peak and curve the planner uses: h200 on an H200, h100 elsewhere.
  GPU=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -n 1 | grep -q H200 && echo h200 || echo h100)
  SEQ=4096 STEPS=10 COMPILE=true LOSS=liger LONG_MODEL=llama_1b LONG_SEQS="32768 65536 131072 262144" LONG_TIMEOUT=240
  # The issue-8 bench rows' settings (55.4% and 28.2% MFU there), so the trainer's figures sit next to them.
  PAIRS=("llama_1b 8 execution.activation_checkpointing=selective" "deepseek_1b_active 2 model.mtp.depth=0")
fi
VOCAB=8192  # the demo tokenizer's; the bench draws synthetic tokens from the same vocabulary

step() { echo "=== [$(date +%T)] $*"; }
jsonl() { grep '^{' | tail -n 1; }  # an entry point's result: its last JSON line

step "tokenizer and shards from the repo's licensed sample"
if [[ ! -f $OUT/data/manifest.json ]]; then
  $PY -m tokenizer.train tokenizer=ko8k data=ko_sample out="$OUT/tokenizer" > "$OUT/tokenizer.log" 2>&1
  $PY -m data_pipeline.prepare data=ko_sample tokenizer.path="$OUT/tokenizer" out="$OUT/data" > "$OUT/prepare.log" 2>&1
fi

export OUT PY
pretrain() {  # pretrain RUN_DIR SEQ MICRO_BATCH STEPS MODEL OVERRIDES...: one rank, the trainer's whole path
  local run=$1 seq=$2 mb=$3 steps=$4 model=$5
  shift 5
  rm -rf "$run"
  $PY -m launch.run --standalone --nproc_per_node 1 -m train.pretrain model="$model" tokenizer.path="$OUT/tokenizer" \
    data.path="$OUT/data" run.dir="$run" train.seq_len="$seq" train.micro_batch_size="$mb" \
    train.global_batch_tokens=$((seq * mb)) train.max_steps="$steps" train.eval_every=0 deepspeed.zero_stage=1 \
    checkpoint.every_steps=100000 logging.wandb.mode=disabled logging.progress=false "$@"
}
export -f pretrain

if [[ ,$PARTS, == *,pairs,* ]]; then
  rm -f "$OUT/bench.jsonl" "$OUT/plan.jsonl"
  specs=$OUT/bench.jsonl
  for pair in "${PAIRS[@]}"; do
    read -r model mb extra <<< "$pair"
    step "$model: train.bench, micro-batch $mb x $SEQ"
    $PY -m train.bench model="$model" model.vocab_size=$VOCAB bench.seq_len=$SEQ bench.micro_batch_size="$mb" \
      bench.steps=$STEPS bench.peer=false bench.compile=$COMPILE execution.loss_impl=$LOSS $extra \
      2> "$OUT/bench_$model.log" | jsonl >> "$OUT/bench.jsonl"
    step "$model: train.pretrain (DeepSpeed ZeRO-1, one rank), the same shapes and options"
    pretrain "$OUT/run_$model" $SEQ "$mb" $STEPS "$model" execution.compile=$COMPILE execution.loss_impl=$LOSS $extra \
      > "$OUT/pretrain_$model.log" 2>&1
    specs+=",$OUT/run_$model@1"
    step "$model: launch.plan gpus=1"
    $PY -m launch.plan model="$model" gpus=1 gpu=$GPU vocab_size=$VOCAB seq_len=$SEQ micro_batch_size="$mb" \
      global_batch_tokens=$((SEQ * mb)) deepspeed.zero_stage=1 execution.compile=$COMPILE \
      execution.loss_impl=$LOSS $extra | jsonl >> "$OUT/plan.jsonl"
  done
  step "every record against the $GPU preset, then against a GEMM curve measured here"
  $PY -m launch.fit_efficiency gpu=$GPU fit=false results="$specs" > "$OUT/planner_check.txt"
  $PY -m launch.fit_efficiency gpu=$GPU curve=true fit=false results="$specs" out="$OUT/$GPU-measured.yaml" \
    > "$OUT/planner_check_measured_curve.txt"
  grep '^#' "$OUT/planner_check.txt" "$OUT/planner_check_measured_curve.txt"
  $PY - "$OUT" > "$OUT/pairs.md" <<'EOF'
import json, statistics, sys
from pathlib import Path

out = Path(sys.argv[1])
bench = [json.loads(x) for x in (out / "bench.jsonl").read_text().splitlines()]
plan = [json.loads(x) for x in (out / "plan.jsonl").read_text().splitlines()]
print("| model | micro-batch x seq | bench tokens/s | bench MFU | bench peak GB | trainer tokens/s | trainer MFU "
      "| trainer peak GB | planner tokens/s | planner MFU | planner memory GB |")
print("|---|---|---|---|---|---|---|---|---|---|---|")
for b, p in zip(bench, plan):
    rows = [json.loads(x) for x in (out / f"run_{b['model']}" / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if r.get("step", 0) >= 3 and "tokens_per_s" in r]  # steps 1-2 pay for warm-up and compile
    tps = statistics.median(r["tokens_per_s"] for r in rows)
    mfu = statistics.median(r["mfu"] or 0.0 for r in rows)
    print(f"| {b['model']} | {b['micro_batch_size']} x {b['seq_len']} | {b['tokens_per_s']:,.0f} | {b['mfu']:.1%} "
          f"| {b['peak_mem_gb']:.1f} | {tps:,.0f} | {mfu:.1%} | {max(r['peak_mem_gb'] for r in rows):.1f} "
          f"| {p['tokens_per_s_per_gpu']:,.0f} | {p['mfu']:.1%} | {p['memory_gb']['total_checkpointed']:.1f} |")
EOF
  cat "$OUT/pairs.md"
fi

if [[ ,$PARTS, == *,long,* ]]; then
  rm -f "$OUT/long.jsonl"
  for seq in $LONG_SEQS; do
    step "$LONG_MODEL: one sequence of $seq tokens per step"
    run=$OUT/long_$seq
    opts=(model.max_seq_len="$seq" execution.activation_checkpointing=full execution.loss_impl=$LOSS)
    ok=true
    # A run past the limit is stopped (timeout signals the whole process group) and counts as not trained.
    timeout -k 60 "$LONG_TIMEOUT" bash -c 'pretrain "$@"' _ "$run" "$seq" 1 2 $LONG_MODEL "${opts[@]}" \
      > "$OUT/long_$seq.log" 2>&1 || ok=false
    plan=$($PY -m launch.plan model=$LONG_MODEL gpus=1 gpu=$GPU vocab_size=$VOCAB seq_len="$seq" micro_batch_size=1 \
      global_batch_tokens="$seq" deepspeed.zero_stage=1 "${opts[@]}" | jsonl)
    $PY - "$run" "$seq" "$ok" "$plan" >> "$OUT/long.jsonl" <<'EOF'
import json, sys
from pathlib import Path

run, seq, ok, plan = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3] == "true", json.loads(sys.argv[4])
rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()] if (run / "metrics.jsonl").exists() else []
rows = [r for r in rows if "peak_mem_gb" in r]
measured = {k: rows[-1].get(k) for k in ("peak_mem_gb", "tokens_per_s", "mfu")} if ok and rows else {}
mem = plan["memory_gb"]
predicted = {"plan_mem_gb": mem["total_checkpointed"], "plan_capacity_gb": mem["capacity"], "plan_step_time_s": plan["step_time_s"]}
print(json.dumps({"seq_len": seq, "trained": ok, **measured, **predicted}))
EOF
    tail -n 1 "$OUT/long.jsonl"
    [[ $ok == true ]] || break
  done
fi
step "done: $OUT"
