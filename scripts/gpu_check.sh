#!/usr/bin/env bash
# On a machine with an NVIDIA GPU: the reference model on CUDA against the CPU (fp32, fp16, bf16), the exported
# bundle on ONNX Runtime (CPU, and CUDA where onnxruntime-gpu is installed), the cuda-python device copies of the
# TensorRT backend where cuda-python is installed, and, where tensorrt imports and a device is visible, the engine
# build (its layers printed by the engine inspector) with TensorRT parity; otherwise "TensorRT: not checked: <why>".
# Prints a parity table and decode latencies.
# Uses the project's virtual environment when there is one, else python3 with this checkout on PYTHONPATH.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! command -v nvidia-smi >/dev/null 2>&1; then
  echo "gpu check: nvidia-smi not found: this machine has no NVIDIA GPU driver"
  exit 1
fi
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
PY=python3
[ -x .venv/bin/python ] && PY=.venv/bin/python
PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" "$PY" scripts/gpu_check.py
