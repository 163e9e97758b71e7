#!/usr/bin/env bash
# Create .venv and install onnxbits with its test dependencies (idempotent).
# torch/torchvision are pinned to the releases onnx2torch works with here (2.14.1 / 0.29.1).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
if ! .venv/bin/python -c "import torch, torchvision, onnx2torch, onnxbits" 2>/dev/null; then
  .venv/bin/pip install -q --disable-pip-version-check torch==2.14.1 torchvision==0.29.1
  .venv/bin/pip install -q --disable-pip-version-check -e '.[test]'
fi
