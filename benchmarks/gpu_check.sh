#!/usr/bin/env bash
# Every GPU check of the fused attention stage in one run, for a machine with an NVIDIA GPU:
# the kernel tests compiled (not interpreted), the attention table, and the train-step table.
# Usage (from the repository root, with the project installed): bash benchmarks/gpu_check.sh [OUT_DIR]
set -uo pipefail
out=${1:-gpu_check}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 TRITON_INTERPRET=0
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$out/gpu.txt"
python -m pytest -q tests/test_triton.py tests/test_attention.py 2>&1 | tee "$out/kernel_tests.txt"
python benchmarks/attention.py 2>&1 | tee "$out/attention.txt"
python benchmarks/train_step.py --presets pgm-small --backends reference flex triton 2>&1 | tee "$out/train_step.txt"
python benchmarks/sampling.py --batch 32 --seq-len 1024 --steps 128 2>&1 | tee "$out/sampling.txt"
