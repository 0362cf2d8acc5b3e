#!/usr/bin/env bash
# Stage one with a SLURM array: every task scores its own contiguous slice of the input and writes
# its own shards into one output folder; the last to finish writes manifest.json.
#   sbatch --array=0-15 pipelines/launch/score_slurm_array.sh pipelines/recipes/llama3-8b-instruct/score.yaml
#SBATCH --job-name=treg-score
#SBATCH --gpus-per-task=1
set -euo pipefail
CONFIG=${1:?usage: score_slurm_array.sh SCORE.yaml [more treg-score flags]}
shift
exec treg-score --config "$CONFIG" \
  --num-workers "${SLURM_ARRAY_TASK_COUNT:-1}" --worker-index "${SLURM_ARRAY_TASK_ID:-0}" "$@"
