#!/bin/bash
# Two nodes × N GPUs with torchrun's c10d rendezvous. Run the same command on every node:
#   NODE0=10.0.0.1 NPROC=8 NNODES=2 bash launch/multinode.sh --config ms1mv3_r50 --set data.manifest=...
# NODE0 is the address of the first node; every node must reach NODE0:PORT.
set -euo pipefail
: "${NODE0:?set NODE0 to the first node\'s address}"
exec shardface train \
    --nproc-per-node "${NPROC:-8}" \
    --nnodes "${NNODES:-2}" \
    --rdzv-endpoint "${NODE0}:${PORT:-29500}" \
    --rdzv-id "${RUN_ID:-shardface}" \
    --max-restarts "${MAX_RESTARTS:-0}" \
    "$@"
