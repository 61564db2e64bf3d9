#!/usr/bin/env bash
# Every GPU check of the fused attention stage in one run, for a machine with an NVIDIA GPU:
# the kernel tests compiled (not interpreted), the bf16 kernels against the fp32 reference
# (Triton's CPU interpreter cannot check bf16), the attention table, and the train-step table.
# Usage (from the repository root, with the project installed): bash benchmarks/gpu_check.sh [OUT_DIR]
# Exits 1, naming the failed steps, when a test fails or a bf16 error exceeds its tolerance.
set -uo pipefail
out=${1:-gpu_check}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 TRITON_INTERPRET=0
failed=()
step() {  # step NAME COMMAND...: run, keep the output in $out/NAME.txt, remember a failure
    local name=$1
    shift
    "$@" 2>&1 | tee "$out/$name.txt" || failed+=("$name")
}
step gpu nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
step kernel_tests python -m pytest -q tests/test_triton.py tests/test_attention.py
# bf16 out / dq / dk / dv of each head dim, L not a multiple of the tile, against fp32 SDPA on
# the same inputs; fails over 2% of each tensor's largest magnitude (SDPA's own bf16: ~0.5%).
step bf16_check python benchmarks/attention.py --check 2e-2 --dtype bfloat16 --backends reference triton \
    --shapes 256/16 512/16 768/12 1024/8 --lengths 1000 --batch 2
step attention python benchmarks/attention.py
step train_step python benchmarks/train_step.py --presets pgm-small --backends reference flex triton
step sampling python benchmarks/sampling.py --batch 32 --seq-len 1024 --steps 128
if ((${#failed[@]})); then
    echo "GPU CHECK FAILED: ${failed[*]} (outputs in $out/)" >&2
    exit 1
fi
echo "all GPU checks passed (outputs in $out/)"
