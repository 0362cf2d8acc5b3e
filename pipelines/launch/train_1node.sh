#!/usr/bin/env bash
# Train on one node with 8 GPUs.
#   bash pipelines/launch/train_1node.sh pipelines/recipes/llama3-8b-instruct/dpo_reg.yaml runs/llama3-dpo-reg
set -euo pipefail
CONFIG=${1:?usage: train_1node.sh CONFIG.yaml OUTPUT [more treg-train flags]}
OUTPUT=${2:?usage: train_1node.sh CONFIG.yaml OUTPUT [more treg-train flags]}
shift 2
RESUME=()
[ -d "$OUTPUT/checkpoints" ] && RESUME=(--resume)   # a rerun after a crash continues
exec torchrun --standalone --nproc-per-node "${GPUS_PER_NODE:-8}" -m treg_train \
  --config "$CONFIG" --output "$OUTPUT" "${RESUME[@]}" "$@"
