#!/usr/bin/env bash
# Every GPU check in one run on one NVIDIA GPU, sized for an H200 (under 8 minutes), after the
# README's install command. Writes OUT_DIR/results.md (each step's status and seconds, the
# target lines, then every table) and OUT_DIR/steps/STEP.txt (each step's whole output):
#   env                the GPU, torch / triton / deepspeed versions
#   kernel_tests       tests/unit/attention/test_triton.py, test_attention.py, tests/e2e/attention/test_triton_compile.py, tests/unit/models/test_memory_paths.py, Triton compiled
#   bf16_check         bf16 kernels against fp32 SDPA (Triton's CPU interpreter cannot check bf16)
#   attention          forward + backward at pgm-small's shape (768/12), bf16, L 1024 and 4096,
#                      batch 8: dense-mask SDPA (reference), flex, fused Triton; target: Triton
#                      >= 2.5x reference at L 1024 in both modes
#   train_step         pgm-small, bf16, ZeRO-2 through pgm_dist's Engine as one rank, micro-batch 8,
#                      L 1024, V 50,258: each backend, loss chunk 0 and 1024: tokens/s, MFU (target
#                      >= 40%), peak memory (torch.cuda.max_memory_allocated)
#   train_step_ckpt    the same, Triton, chunk 1024, --activation-checkpointing
#   train_step_plain   the same step as a plain torch AdamW under autocast (no DeepSpeed)
#   sampling           PGM vs MDLM, batch 32, L 1024, 128 steps, bf16 (the paper: 5.3x)
#   image_sampling     pgm-img-b's Halton sampler vs a MaskGIT-style baseline, batch 64, 32 steps
#                      (the paper: 7.5x on the 32x32 grid)
#   sdtt_teacher       one SDTT distillation micro-step at pgm-small's shape, L 1024: the teacher in fp32
#                      beside the teacher under bf16 autocast (the student's precision), and the bf16
#                      target's KL from the fp32 one
#   train_step_compile the train_step row of Triton, chunk 1024, with --compile (last: its compile
#                      time is the least certain)
# Usage (repository root): bash benchmarks/gpu_check.sh [--cpu-smoke] [OUT_DIR]
#   OUT_DIR: default $OUT, else gpu_check.
#   --cpu-smoke: every step on the CPU at tiny shapes (Triton in its interpreter, a subset of the
#   kernel tests), to check the script end to end without a GPU (2.5 minutes on 2 idle cores);
#   its numbers mean nothing.
# Each step has a cap in seconds, and the whole run a budget (GPU_CHECK_BUDGET, default 470 s;
# steps are ordered by importance): a step is cut at the budget, and skipped with under 15 s left.
# Exits 1, naming the failed, timed-out or skipped steps (a missed speed target is reported in
# results.md, not a failure).
set -uo pipefail
smoke=0
if [[ ${1:-} == --cpu-smoke ]]; then
    smoke=1
    shift
fi
out=${1:-${OUT:-gpu_check}}
mkdir -p "$out"
rm -rf "$out/steps" "$out/results.md"
mkdir "$out/steps"
export PYTHONUNBUFFERED=1
budget=${GPU_CHECK_BUDGET:-470}
started="$(date -u '+%Y-%m-%d %H:%M') UTC, commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
versions='import torch, triton, deepspeed
print("torch", torch.__version__, "| triton", triton.__version__, "| deepspeed", deepspeed.__version__)
print("device:", torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu")'

if ((smoke)); then
    mode="CPU smoke run (tiny shapes; the numbers mean nothing)"
    export CUDA_VISIBLE_DEVICES="" TRITON_INTERPRET=1
    kernel_tests=(-k "empty_groups and mixed or written_out_softmax or dense_path and 7-pgm")
    bf16=(--dtype float16 --shapes 64/4 --lengths 40 --batch 1)
    attention=(--shapes 64/4 --lengths 32 64 --batch 1 --repeats 1 --dtype float32 --target-length 64)
    train=(--presets pgm-tiny --vocab-size 256 --seq-len 32 --batch 2 --steps 1 --dtype float32)
    sampling=(--pgm pgm-tiny --mdlm mdlm-tiny --vocab-size 512 --batch 2 --seq-len 64 --steps 4 --dtype float32)
    image=(--pgm pgm-img-tiny --grids digits --batch 4 --steps 4 --repeats 1)
    teacher=(--preset pgm-tiny --batch 2 --seq-len 32 --vocab-size 256 --repeats 1)
    device=cpu
else
    mode="GPU run"
    export TRITON_INTERPRET=0
    if ! python -c "import torch; assert torch.cuda.is_available()" 2>/dev/null; then
        echo "gpu_check: no CUDA GPU visible to torch (bash benchmarks/gpu_check.sh --cpu-smoke checks the script)" >&2
        exit 1
    fi
    kernel_tests=()
    bf16=(--dtype bfloat16 --shapes 256/16 512/16 768/12 1024/8 --lengths 1000 --batch 2)
    attention=(--shapes 768/12 --lengths 1024 4096 --batch 8 --repeats 10 --dtype bfloat16 --target-length 1024)
    train=(--presets pgm-small --vocab-size 50258 --seq-len 1024 --batch 8 --steps 5 --dtype bfloat16)
    sampling=(--batch 32 --seq-len 1024 --steps 128 --dtype bfloat16)
    image=(--pgm pgm-img-b --batch 64 --steps 32)
    teacher=(--preset pgm-small --batch 8 --seq-len 1024 --vocab-size 50258 --repeats 5)
    device=cuda
fi

failed=()
summary=()
t_start=$SECONDS

write_results() {
    {
        echo "# benchmarks/gpu_check.sh: $mode, $started"
        echo
        echo "| step | status | seconds |"
        echo "| --- | --- | ---: |"
        printf '%s\n' "${summary[@]}"
        echo
        echo "## Targets"
        echo
        # "- STEP: line" for each verdict line (grep -H prefixes the file's path)
        grep -H "TARGET\|^SAMPLING" "$out"/steps/*.txt 2>/dev/null | sed -E 's|^.*/steps/([a-z_0-9]+)\.txt:|- \1: |'
        grep -h "PGM (Halton)" "$out/steps/image_sampling.txt" 2>/dev/null \
            | sed 's/^/- image sampling, the paper: 7.5x on 32x32 (grid, sampler, params M, images\/s, ratio): /'
        echo
        cat "$out/sections.md"
    } >"$out/results.md"
}

step() { # step NAME CAP_SECONDS COMMAND...: run under min(cap, budget left), record status and output
    local name=$1 cap=$2 rc status
    shift 2
    local t0=$SECONDS left=$((budget - (SECONDS - t_start)))
    if ((left < 15)); then
        status="skipped: budget of ${budget} s spent"
        echo "== $name: $status"
        : >"$out/steps/$name.txt"
    else
        ((cap > left)) && cap=$left
        echo "== $name (at most $cap s): $*"
        timeout -k 10 "$cap" "$@" 2>&1 | tee "$out/steps/$name.txt"
        rc=${PIPESTATUS[0]}
        case $rc in
            0) status=ok ;;
            124 | 137) status="timed out after $cap s" ;;
            *) status="failed (exit $rc)" ;;
        esac
    fi
    [[ $status == ok ]] || failed+=("$name")
    summary+=("| $name | $status | $((SECONDS - t0)) |")
    {
        echo "## $name: $status, $((SECONDS - t0)) s"
        echo
        echo "\`$*\`"
        echo
        echo '```text'
        # DeepSpeed's timestamped log lines are noise here; the whole output stays in steps/.
        grep -Ev '^\[[0-9]{4}-[0-9]{2}-[0-9]{2} [0-9:,]+\] \[|built successfully$' "$out/steps/$name.txt" | tail -n 120
        echo '```'
        echo
    } >>"$out/sections.md"
    write_results
}

: >"$out/sections.md"
if ((smoke)); then
    step env 30 python -c "$versions"
else
    step env 30 bash -c "nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv && python -c '$versions'"
fi
step kernel_tests 180 python -m pytest -q -p no:cacheprovider tests/unit/attention tests/e2e/attention \
    tests/unit/models/test_memory_paths.py tests/unit/models/test_linear_ce.py tests/e2e/models/test_compile.py "${kernel_tests[@]}"
# bf16 out / dq / dk / dv of each head dim, L not a multiple of the tile, against fp32 SDPA on
# the same inputs; fails over 2% of each tensor's largest magnitude (SDPA's own bf16: ~0.5%).
step bf16_check 60 python benchmarks/attention.py --check 2e-2 --backends reference triton --device $device "${bf16[@]}"
step attention 90 python benchmarks/attention.py --backends reference flex triton --target 2.5 --device $device \
    "${attention[@]}"
step train_step 150 python benchmarks/train_step.py --engines deepspeed --backends reference triton flex \
    --loss-chunks 0 1024 --fused on --checkpointing off --target-mfu 0.4 --device $device "${train[@]}"
# the loss paths side by side: dense, chunks recomputed in backward, the fused op (issue 22)
step fused_loss 60 python benchmarks/train_step.py --engines deepspeed --backends triton --loss-chunks 0 1024 \
    --fused off on --checkpointing off --device $device "${train[@]}"
step train_step_ckpt 45 python benchmarks/train_step.py --engines deepspeed --backends triton --loss-chunks 1024 \
    --checkpointing on --target-mfu 0.4 --device $device "${train[@]}"
step train_step_plain 45 python benchmarks/train_step.py --engines plain --backends triton --loss-chunks 1024 \
    --checkpointing off --target-mfu 0.4 --device $device "${train[@]}"
step sampling 75 python benchmarks/sampling.py --device $device "${sampling[@]}"
step image_sampling 75 python benchmarks/image_sampling.py --device $device "${image[@]}"
step sdtt_teacher 60 python benchmarks/sdtt_teacher.py --device $device "${teacher[@]}"
step train_step_compile 150 python benchmarks/train_step.py --engines deepspeed --backends triton --loss-chunks 1024 \
    --checkpointing off --compile on --target-mfu 0.4 --device $device "${train[@]}"
rm -f "$out/sections.md"

echo "results: $out/results.md ($((SECONDS - t_start)) s)"
if ((${#failed[@]})); then
    echo "GPU CHECK FAILED: ${failed[*]} (outputs in $out/steps/)" >&2
    exit 1
fi
echo "all GPU checks passed"
