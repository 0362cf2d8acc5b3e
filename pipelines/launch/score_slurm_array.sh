#!/usr/bin/env bash
# Stage one with a SLURM array: every task scores its own contiguous slice of the input and writes
# its own shards into one output folder; the last to finish writes manifest.json.
#   sbatch --array=0-15 pipelines/launch/score_slurm_array.sh pipelines/recipes/llama3-8b-instruct/score.yaml
# The number of workers is NUM_WORKERS, else the array's size: a full first submission needs no NUM_WORKERS, a
# resubmission of some tasks does (treg-score --status OUTPUT prints the exact command):
#   sbatch --array=1,3-5 --export=ALL,NUM_WORKERS=16 pipelines/launch/score_slurm_array.sh SCORE.yaml
#SBATCH --job-name=treg-score
#SBATCH --gpus-per-task=1
set -euo pipefail
CONFIG=${1:?usage: score_slurm_array.sh SCORE.yaml [more treg-score flags]}
shift
if [[ -z "${NUM_WORKERS:-}" && -n "${SLURM_ARRAY_TASK_MAX:-}" ]] &&
   [[ "${SLURM_ARRAY_TASK_MIN:-0}" != 0 || $((SLURM_ARRAY_TASK_MAX + 1)) != "${SLURM_ARRAY_TASK_COUNT:-}" ]]; then
  # --array=1,3-5 has 4 tasks, but the run has more workers: its size is no worker count
  echo "score_slurm_array.sh: an array of some of the workers (${SLURM_ARRAY_TASK_COUNT:-?} tasks) needs the run's" \
    "number of workers: sbatch --export=ALL,NUM_WORKERS=N ... (treg-score --status OUTPUT prints the command)" >&2
  exit 2
fi
exec treg-score --config "$CONFIG" \
  --num-workers "${NUM_WORKERS:-${SLURM_ARRAY_TASK_COUNT:-1}}" --worker-index "${SLURM_ARRAY_TASK_ID:-0}" "$@"
