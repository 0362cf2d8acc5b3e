#!/usr/bin/env bash
# Stage one on a Ray cluster (pip install 'treg[ray]'): NUM_ACTORS scoring actors, one engine each
# (--tensor-parallel-size GPUs per actor), take the input's parts one at a time; the driver writes manifest.json.
# Run it on a machine of the cluster (after `ray start --head` there, `ray start --address HEAD:6379` on the others):
#   NUM_ACTORS=8 bash pipelines/launch/score_ray.sh pipelines/recipes/llama3-8b-instruct/score.yaml
# More parts than actors balance the load (--num-workers 32). A rerun of the same command scores only the parts
# left unfinished; keep --num-workers as it was (treg-score --status OUTPUT prints the command).
set -euo pipefail
CONFIG=${1:?usage: score_ray.sh SCORE.yaml [more treg-score flags]}
shift
exec treg-score --config "$CONFIG" --executor ray --ray-address "${RAY_ADDRESS:-auto}" \
  --num-actors "${NUM_ACTORS:-1}" "$@"
