#!/usr/bin/env bash
# Train on one node with 8 GPUs.
#   bash pipelines/launch/train_1node.sh pipelines/recipes/llama3-8b-instruct/dpo_reg.yaml runs/llama3-dpo-reg
# SIGUSR1 or SIGTERM to every process of the run (Slurm's --signal does that) stops it at the next step with a
# checkpoint: the ranks exit 75 and write OUTPUT/stopped.json, torchrun exits 1; rerun the script to go on.
set -euo pipefail
CONFIG=${1:?usage: train_1node.sh CONFIG.yaml OUTPUT [more treg-train flags]}
OUTPUT=${2:?usage: train_1node.sh CONFIG.yaml OUTPUT [more treg-train flags]}
shift 2
RESUME=()
[ -d "$OUTPUT/checkpoints" ] && RESUME=(--resume)   # a rerun after a crash or a stop continues
rm -f "$OUTPUT/stopped.json"   # a stop of this run writes it again
# SIGUSR1 would kill torchrun's agent (it forwards only SIGTERM, SIGINT, SIGHUP, SIGQUIT): ignored, and the ranks
# inherit that through exec, until treg-train's own handler takes it over.
trap '' USR1
exec torchrun --standalone --nproc-per-node "${GPUS_PER_NODE:-8}" -m treg_train \
  --config "$CONFIG" --output "$OUTPUT" "${RESUME[@]}" "$@"
