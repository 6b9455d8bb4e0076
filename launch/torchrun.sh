#!/usr/bin/env bash
# Launch pretraining with torchrun on one node or many.
#
# One node, all its GPUs:
#   bash launch/torchrun.sh experiment=ko_tiny run.dir=runs/exp1
# Many nodes: run the same command on every node with NNODES, NODE_RANK and MASTER_ADDR set
# (MASTER_ADDR = the first node's hostname), e.g. on 2 nodes of 8 GPUs:
#   node0$ NNODES=2 NODE_RANK=0 MASTER_ADDR=node0 bash launch/torchrun.sh experiment=ko_tiny run.dir=/shared/runs/exp1
#   node1$ NNODES=2 NODE_RANK=1 MASTER_ADDR=node0 bash launch/torchrun.sh experiment=ko_tiny run.dir=/shared/runs/exp1
# run.dir, tokenizer.path and data.path must be on storage every node sees.
# A rank that dies (crash, kill -9, lost node) makes torchrun restart every worker, up to MAX_RESTARTS times (default
# 3); the restarted job resumes from RUN_DIR/checkpoints/latest by itself (checkpoint.resume=auto). A config error
# (exit status 2) is printed once and not retried. Ctrl-C / SIGTERM / SIGUSR1: every rank finishes its step, saves,
# and the launcher exits 0 (launch.run = torchrun with those changes; see train/engine/launcher.py).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
NNODES=${NNODES:-1}
if [[ -z "${NPROC_PER_NODE:-}" ]]; then
  NPROC_PER_NODE=$(nvidia-smi -L 2>/dev/null | wc -l || true)
  [[ "$NPROC_PER_NODE" -gt 0 ]] || NPROC_PER_NODE=2  # CPU: two gloo processes
fi
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
MASTER_PORT=${MASTER_PORT:-29500}
RDZV_ID=${RDZV_ID:-hangang}
MAX_RESTARTS=${MAX_RESTARTS:-3}

exec "$PY" -m launch.run \
  --nnodes="$NNODES" --nproc_per_node="$NPROC_PER_NODE" --max-restarts="$MAX_RESTARTS" \
  --rdzv-backend=c10d --rdzv-endpoint="$MASTER_ADDR:$MASTER_PORT" --rdzv-id="$RDZV_ID" \
  -m train.pretrain "$@"
