#!/usr/bin/env bash
# Runs on a GPU machine, from the repository root, with .device/ made
# by tools/gpu_pack.sh carried along: every test executable, the GPU tests
# under compute-sanitizer (memcheck, racecheck), and the full-configuration
# check; writes $OUT/gpu-tests.json and the logs.
set -uo pipefail
OUT=${OUT:-/tmp/gpu-check}
mkdir -p "$OUT"
# The build_root link and target/release/fcd that the tests need.
# shellcheck source=tools/device_env.sh
source "$(dirname "$0")/device_env.sh"
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"

# TESTS=0 skips the plain test pass and the full configuration (a
# sanitizer-only call that fits the device tool's 10 minutes).
: > "$OUT/tests.log"
: > "$OUT/full.log"
if [ "${TESTS:-1}" = 1 ]; then
    for t in .device/tests/*; do
        echo "=== $(basename "$t")" | tee -a "$OUT/tests.log"
        "$t" --include-ignored --test-threads 1 --nocapture 2>&1 | tee -a "$OUT/tests.log" | grep -E "test result|skipped:|FAILED|panicked"
    done

    echo "=== full configuration" | tee -a "$OUT/tests.log"
    .device/bench_gpu_full_config 2>&1 | tee "$OUT/full.log"
fi

# SANITIZE=0 skips the sanitizer passes (a quick first look).
: > "$OUT/sanitizer.log"
# memcheck on every GPU test executable; racecheck (shared-memory hazards,
# per kernel) on the op-level ones, which launch every kernel: under
# racecheck the whole-network tests take over five minutes.
sanitize() {
    echo "=== $1 $(basename "$2")" | tee -a "$OUT/sanitizer.log"
    compute-sanitizer --tool "$1" --error-exitcode 99 "$2" --include-ignored --test-threads 1 --skip gpu_sampler_n100 \
        > "$OUT/san_$1_$(basename "$2").log" 2>&1
    echo "exit $?" >> "$OUT/san_$1_$(basename "$2").log"
    grep -E "ERROR SUMMARY|RACECHECK SUMMARY|test result|exit " "$OUT/san_$1_$(basename "$2").log" | tee -a "$OUT/sanitizer.log"
}
if [ "${SANITIZE:-1}" = 1 ]; then
    for t in .device/tests/cuda_*; do sanitize memcheck "$t"; done
    for t in .device/tests/cuda_ddim .device/tests/cuda_ops .device/tests/cuda_norm_attention .device/tests/cuda_post \
        .device/tests/cuda_igemm .device/tests/cuda_flash .device/tests/cuda_attention_gemm; do
        sanitize racecheck "$t"
    done
fi

python3 - "$OUT" <<'PY'
import json, re, sys
out = sys.argv[1]
tests = open(f"{out}/tests.log").read()
san = open(f"{out}/sanitizer.log").read()
passed = sum(int(m) for m in re.findall(r"test result: \w+\. (\d+) passed", tests))
failed = sum(int(m) for m in re.findall(r"(\d+) failed", tests))
skipped = len(re.findall(r"skipped:", tests))
errors = sum(int(m) for m in re.findall(r"ERROR SUMMARY: (\d+) error", san)) + sum(int(m) for m in re.findall(r"\((\d+) errors,", san))
bad_exit = len(re.findall(r"exit (?!0\b)\d+", san))
full = {}
for line in open(f"{out}/full.log"):
    line = line.strip()
    if line.startswith("{"):
        full = json.loads(line)
gpu, driver = [s.strip() for s in open(f"{out}/gpu.txt").read().split(",")[:2]]
commit = open(".device/commit").read().split()
report = {
    "commit": commit[0], "dirty_tree": len(commit) > 1, "gpu": gpu, "driver": driver,
    "passed": passed, "failed": failed, "skipped": skipped,
    "sanitizer_errors": errors, "sanitizer_nonzero_exits": bad_exit,
    "full_config": {k: full.get(k) for k in ["unet_rel_l2", "grad_rel_l2", "sampler_seconds_batch8"]},
    "full_config_detail": full,
}
json.dump(report, open(f"{out}/gpu-tests.json", "w"), indent=1)
print(json.dumps(report, indent=1))
PY
