#!/usr/bin/env bash
# GPU checks over binaries staged by scripts/gpu-stage.sh; builds nothing. Runs every staged
# test with DPO_REQUIRE_GPU=1 (so nothing may skip), compute-sanitizer memcheck and racecheck
# on a small CUDA-vs-CPU run, and the bandwidth bench. Logs go to $OUT (default ./gpu-out):
#   env.log        nvidia-smi, NVRTC and header locations
#   tests.log      every test binary
#   sanitizer.log  memcheck and racecheck
#   bench.log      dpo_cuda bench with achieved GB/s against a device-to-device copy
# Exits non-zero when a test fails, a sanitizer reports an error, or the bench fails.
set -uo pipefail

cd "$(dirname "$0")/.."
CARRY="${DPO_GPU_CARRY:-.gpu-carry}"
OUT="${OUT:-$PWD/gpu-out}"
mkdir -p "$OUT"
failed=0

if [[ ! -d "$CARRY/bin" ]]; then
    echo "gpu-check: $CARRY/bin is missing; run scripts/gpu-stage.sh first and carry $CARRY"
    exit 2
fi

# 1. NVRTC and headers from the machine's CUDA toolkit or pip wheels. cudarc looks for
#    libnvrtc.so or libnvrtc.so.12, so a toolkit that only ships another soname gets a link.
{
    nvidia-smi || true
    nvrtc=""
    for candidate in /usr/local/cuda/lib64/libnvrtc.so /usr/local/cuda/lib64/libnvrtc.so.* \
        /usr/local/cuda/targets/x86_64-linux/lib/libnvrtc.so* \
        "$(python3 -c 'import nvidia, os; print(os.path.dirname(nvidia.__path__[0]))' \
            2>/dev/null)"/nvidia/*/lib/libnvrtc.so*; do
        if [[ -f "$candidate" && "$candidate" != *builtins* && "$candidate" != *alt* ]]; then
            nvrtc="$candidate"
            break
        fi
    done
    echo "nvrtc: ${nvrtc:-not found}"
    if [[ -n "$nvrtc" ]]; then
        mkdir -p /tmp/dpo-nvrtc
        ln -sf "$nvrtc" /tmp/dpo-nvrtc/libnvrtc.so
        export LD_LIBRARY_PATH="/tmp/dpo-nvrtc:$(dirname "$nvrtc")${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
    fi
    for include in /usr/local/cuda/include \
        "$(dirname "$(dirname "${nvrtc:-/x/x}")")/include"; do
        if [[ -f "$include/cuda_bf16.h" ]]; then
            export DPO_CUDA_INCLUDE="$include"
            break
        fi
    done
    echo "DPO_CUDA_INCLUDE=${DPO_CUDA_INCLUDE:-not found}"
    echo "LD_LIBRARY_PATH=${LD_LIBRARY_PATH:-}"
} >"$OUT/env.log" 2>&1
# The exports above ran in a group, not a subshell, so they hold here too.
cat "$OUT/env.log"
export DPO_REQUIRE_GPU=1 DPO_REQUIRE_NVRTC=1

# 2. Every staged test binary, one test thread so GPU tests do not contend.
for test in "$CARRY"/bin/test-*; do
    echo "== $(basename "$test")" >>"$OUT/tests.log"
    if ! "$test" --test-threads=1 >>"$OUT/tests.log" 2>&1; then
        echo "FAILED: $(basename "$test")" | tee -a "$OUT/tests.log"
        failed=1
    fi
done
grep -E "^test result|FAILED|panicked" "$OUT/tests.log"

# 3. Sanitizers on a small run that covers every loss, warp-per-row rows and the pair kernel.
#    A sandbox that refuses the sanitizer is recorded, not counted as a kernel error.
for tool in memcheck racecheck; do
    echo "== compute-sanitizer --tool $tool" >>"$OUT/sanitizer.log"
    compute-sanitizer --tool "$tool" "$CARRY/bin/test-cuda_device" --test-threads=1 \
        cuda_matches_cpu_for_every_loss cuda_reports_the_first_faulty_position \
        >>"$OUT/sanitizer.log" 2>&1
    summary=$(grep -E "ERROR SUMMARY|RACECHECK SUMMARY|Device not supported" \
        "$OUT/sanitizer.log" | tail -n 1)
    echo "$tool: ${summary:-no summary}"
    if [[ "$summary" == *"Device not supported"* ]]; then
        echo "$tool: the sanitizer cannot run on this machine"
    elif [[ "$summary" != *" 0 errors"* && "$summary" != *" 0 hazards"* ]]; then
        failed=1
    fi
done

# 4. Bandwidth bench.
if ! "$CARRY/bin/bench-dpo_cuda" --bench >"$OUT/bench.log" 2>&1; then
    echo "FAILED: bench" | tee -a "$OUT/bench.log"
    failed=1
fi
grep -E "GB/s|skipped" "$OUT/bench.log"
if grep -q "bench skipped" "$OUT/bench.log"; then
    failed=1
fi

exit "$failed"
