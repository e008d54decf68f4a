#!/usr/bin/env bash
# The whole GPU picture of a commit in one run of about 8 minutes: op tests,
# the conv kernel tournament, network and sampler tests, `fcd bench` in every
# precision, the PyTorch peer, memcheck on the op tests and one ncu look at
# the top conv kernel. Runs on a GPU machine from the repository root, with
# .device/ from tools/gpu_pack.sh unpacked. Every stage has its own time
# limit (together 450 s, with room for unpacking and the report in 8
# minutes); one that fails or runs out of time does not stop the next.
#
# How to run it (docs/gpu.md):
#   build machine: bash tools/gpu_pack.sh           # writes .device.tar.xz
#   GPU machine:   tar xJf .device.tar.xz && bash tools/device_run.sh
#   Read bench.json first (commit, GPU, stages, bench lines, test counts),
#   stages.json for what failed or timed out, op_tests.log, and the other
#   logs in logs.tar.gz (tar xzf). Some stages alone: STAGES="bench peer"
#   (of op_tests kernels net_tests bench peer memcheck ncu); a longer limit:
#   LIMIT_BENCH_BF16=60 (names below).
#
# Knobs: OUT (/tmp/device-run), CONFIG (the published config), BATCH (16),
# STEPS (10), COMPILE (0; 1 adds the peer's torch.compile max-autotune, which
# takes minutes: run it as STAGES=peer), KERNEL_REPS (the tournament's
# --reps, its default when unset), NCU_KERNEL, NCU_SKIP, NCU_COUNT.
set -uo pipefail
shopt -s nullglob
cd "$(dirname "$0")/.." || exit 1

OUT=${OUT:-/tmp/device-run}
CONFIG=${CONFIG:-tests/fixtures/published/config_t1_cond_multiclass_cg.yaml}
BATCH=${BATCH:-16}
STEPS=${STEPS:-10}
COMPILE=${COMPILE:-0}
STAGES=${STAGES:-}
KERNEL_REPS=${KERNEL_REPS:-}
# The bf16 implicit-GEMM convolutions (igemm_bf16_*, igemm2_bf16_*), not
# their split-K reduction or the weight packing.
NCU_KERNEL=${NCU_KERNEL:-regex:^igemm2?_bf16}
NCU_SKIP=${NCU_SKIP:-0}
NCU_COUNT=${NCU_COUNT:-3}

# Limits in seconds. The bench limits allow the fidelity runs' second, fp32
# pass; the peer's eager setups take ~20 s, its compiled one minutes.
: "${LIMIT_OP_TESTS:=40}"
: "${LIMIT_KERNELS:=110}"
: "${LIMIT_NET_TESTS:=60}"
: "${LIMIT_BENCH_FP32:=30}"
: "${LIMIT_BENCH_TF32:=30}"
: "${LIMIT_BENCH_BF16:=30}"
: "${LIMIT_BENCH_FP16:=30}"
if [ "$COMPILE" = 1 ]; then : "${LIMIT_PEER:=400}"; else : "${LIMIT_PEER:=40}"; fi
: "${LIMIT_MEMCHECK:=50}"
: "${LIMIT_NCU:=30}"

# $OUT holds 7 files, few enough to copy back from any remote runner:
# stages.json, bench.json, bench.jsonl, kernels.json, op_tests.log, ncu.csv
# and logs.tar.gz. Every other log and raw output (the ncu report too) lives
# in $WORK and travels back packed as logs.tar.gz, repacked after each stage
# so that a run killed part-way still leaves what ran.
WORK=$(mktemp -d /tmp/device-run.XXXXXX)
mkdir -p "$OUT" "$WORK/logs"
rm -f "$OUT/stages.json" "$OUT/bench.json" "$OUT/kernels.json" "$OUT/ncu.csv" "$OUT/logs.tar.gz"
: > "$OUT/op_tests.log"
: > "$OUT/bench.jsonl"
: > "$WORK/stages.tsv"

# shellcheck source=tools/device_env.sh
source tools/device_env.sh
timeout 20 nvidia-smi --query-gpu=name,driver_version --format=csv,noheader > "$WORK/gpu.txt" 2>&1

# Fractional seconds where bash has them (5.0 on).
now() { echo "${EPOCHREALTIME:-$SECONDS}"; }

# STAGES empty runs every stage; else only the named ones.
want() { [ -z "$STAGES" ] || [[ " ${STAGES//,/ } " == *" $1 "* ]]; }

# A stage is stage_begin, one stage_cmd per command, stage_end. Each
# command gets what is left of the stage's limit less `reserve` seconds for
# every command still to come, so that one slow executable cannot take the
# whole stage from the quick ones after it. Headers and exit lines go to
# stderr: callers send stdout to a JSON file where the command prints one.
stage_begin() {
    stage=$1 stage_limit=$2 stage_log=$3
    stage_status=0 stage_timed_out=false
    stage_t0=$(now) stage_deadline=$((SECONDS + $2))
    echo "##### $stage (limit ${stage_limit}s) $(date -u +%FT%TZ)" >> "$stage_log"
}

stage_cmd() {
    local reserve=$1 left rc t0
    shift
    left=$((stage_deadline - SECONDS - reserve))
    echo "=== $*" >&2
    if [ "$left" -lt 1 ]; then
        rc=124
        echo "--- not started: no time left in stage $stage" >&2
    else
        t0=$SECONDS
        timeout -k 10 "$left" "$@"
        rc=$?
        echo "--- exit $rc after $((SECONDS - t0)) s (limit ${left}s)" >&2
    fi
    # 124: timeout's TERM; 137: its KILL ten seconds later.
    if [ "$rc" = 124 ] || [ "$rc" = 137 ]; then stage_timed_out=true; fi
    if [ "$stage_status" = 0 ]; then stage_status=$rc; fi
    return "$rc"
}

stage_end() {
    local secs
    secs=$(awk -v a="$stage_t0" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }')
    printf '%s\t%s\t%s\t%s\t%s\n' "$stage" "$stage_status" "$secs" "$stage_limit" "$stage_timed_out" >> "$WORK/stages.tsv"
    echo "##### $stage: exit $stage_status, ${secs} s" >> "$stage_log"
    printf '%-12s exit %-4s %6s s (limit %s s)\n' "$stage" "$stage_status" "$secs" "$stage_limit"
    # awk rather than python: this must work even where the report step
    # would not, and it runs after every stage.
    awk -F'\t' 'BEGIN { print "[" }
        { printf "%s {\"name\": \"%s\", \"status\": %d, \"seconds\": %s, \"limit_s\": %d, \"timed_out\": %s}", (NR > 1 ? ",\n" : ""), $1, $2, $3, $4, $5 }
        END { print "\n]" }' "$WORK/stages.tsv" > "$OUT/stages.json.tmp" && mv "$OUT/stages.json.tmp" "$OUT/stages.json"
    tar -czf "$OUT/logs.tar.gz.tmp" -C "$WORK" . && mv "$OUT/logs.tar.gz.tmp" "$OUT/logs.tar.gz"
}

# run_tests RESERVE EXE...: each test executable in turn, as gpu_check.sh runs them.
run_tests() {
    local reserve=$1 i=0 n
    shift
    n=$#
    for t in "$@"; do
        i=$((i + 1))
        # --nocapture: the GPU tests' 'skipped:' lines are what the report counts.
        stage_cmd $(((n - i) * reserve)) "$t" --include-ignored --test-threads 1 --skip gpu_sampler_n100 --nocapture
    done
}

# 1. The kernel-level tests first: a failure here explains most later ones.
OP_TESTS=(.device/tests/cuda_igemm .device/tests/cuda_flash .device/tests/cuda_norm_attention
    .device/tests/cuda_attention_gemm .device/tests/cuda_ops)
if want op_tests; then
    stage_begin op_tests "$LIMIT_OP_TESTS" "$OUT/op_tests.log"
    run_tests 4 "${OP_TESTS[@]}" >> "$stage_log" 2>&1
    stage_end
fi

# 2. The tournament: times each conv shape on every candidate kernel and
# writes the winners, which the benches then dispatch to; at the benches'
# batch, since the winner can change with it.
if want kernels; then
    reps=()
    [ -n "$KERNEL_REPS" ] && reps=(--reps "$KERNEL_REPS")
    stage_begin kernels "$LIMIT_KERNELS" "$WORK/logs/kernels.log"
    stage_cmd 0 .device/fcd bench --kernels --config "$CONFIG" --batch "$BATCH" "${reps[@]}" \
        --out "$OUT/kernels.json" >> "$stage_log" 2>&1
    stage_end
fi

# 3. Every other test executable, GPU ones first; the N = 100 sampler alone
# would take a minute of the budget.
if want net_tests; then
    rest=()
    for t in .device/tests/cuda_* .device/tests/*; do
        case " ${OP_TESTS[*]} ${rest[*]} " in *" $t "*) continue ;; esac
        [ -f "$t" ] && [ -x "$t" ] && rest+=("$t")
    done
    stage_begin net_tests "$LIMIT_NET_TESTS" "$WORK/logs/net_tests.log"
    if [ ${#rest[@]} = 0 ]; then
        echo "no test executables under .device/tests" >> "$stage_log"
        stage_status=127
    fi
    run_tests 2 "${rest[@]}" >> "$stage_log" 2>&1
    stage_end
fi

# A table only when it parses: a tournament killed mid-write must not make
# every bench fail. One set by the caller is left as it is.
if [ -z "${FCD_KERNEL_TABLE:-}" ] && [ -s "$OUT/kernels.json" ] &&
    python3 -c 'import json, sys; json.load(open(sys.argv[1]))' "$OUT/kernels.json" 2>/dev/null; then
    export FCD_KERNEL_TABLE="$OUT/kernels.json"
fi

# 4. The engine; the JSON line of each run goes to bench.jsonl as printed.
if want bench; then
    for p in fp32 tf32 bf16 fp16; do
        limit_var="LIMIT_BENCH_${p^^}"
        fidelity=()
        # Fidelity: the fp32 engine's maps on the same inputs, for the PSNR.
        [ "$p" != fp32 ] && fidelity=(--fidelity)
        stage_begin "bench_$p" "${!limit_var}" "$WORK/logs/bench.log"
        echo "FCD_KERNEL_TABLE=${FCD_KERNEL_TABLE:-}" >> "$stage_log"
        stage_cmd 0 .device/fcd bench --config "$CONFIG" --device cuda --precision "$p" \
            --batch "$BATCH" --steps "$STEPS" --warmup 1 "${fidelity[@]}" --json \
            > "$WORK/bench_$p.out" 2>> "$stage_log"
        grep '^{' "$WORK/bench_$p.out" >> "$OUT/bench.jsonl"
        stage_end
    done
fi

# 5. The PyTorch peer, one process for both eager setups (it measures the
# bf16 matmul rate, the floor's divisor, too); its line joins bench.jsonl.
if want peer; then
    peer_flags=()
    [ "$COMPILE" = 1 ] || peer_flags=(--skip-compile)
    stage_begin peer "$LIMIT_PEER" "$WORK/logs/peer.log"
    stage_cmd 0 env PYTHONUNBUFFERED=1 python3 benches/pytorch_peer.py --config "$CONFIG" --device cuda \
        --batch "$BATCH" --steps "$STEPS" "${peer_flags[@]}" > "$WORK/peer.out" 2>> "$stage_log"
    grep '^{' "$WORK/peer.out" >> "$OUT/bench.jsonl"
    stage_end
fi

# 6. memcheck on the op tests only: they launch every kernel, and the
# network tests under the sanitizer would not fit the call.
if want memcheck; then
    stage_begin memcheck "$LIMIT_MEMCHECK" "$WORK/logs/memcheck.log"
    i=0
    for t in "${OP_TESTS[@]}"; do
        i=$((i + 1))
        stage_cmd $(((${#OP_TESTS[@]} - i) * 8)) compute-sanitizer --tool memcheck --error-exitcode 99 \
            "$t" --include-ignored --test-threads 1 --skip gpu_sampler_n100 >> "$stage_log" 2>&1
    done
    stage_end
fi

# 7. ncu on a few launches of the conv kernel the bf16 bench ran (same
# kernel table), clocks as found (--clock-control none: the card's settings
# are not ours to change). The report is kept for the Nsight Compute GUI.
if want ncu; then
    stage_begin ncu "$LIMIT_NCU" "$WORK/logs/ncu.log"
    stage_cmd 5 ncu --clock-control none -k "$NCU_KERNEL" --launch-skip "$NCU_SKIP" --launch-count "$NCU_COUNT" \
        --section SpeedOfLight --section Occupancy -f -o "$WORK/ncu" \
        .device/fcd bench --config "$CONFIG" --device cuda --precision bf16 --steps 1 --batch "$BATCH" \
        --warmup 0 --json >> "$stage_log" 2>&1
    if [ -f "$WORK/ncu.ncu-rep" ]; then
        stage_cmd 0 ncu --import "$WORK/ncu.ncu-rep" --csv > "$OUT/ncu.csv" 2>> "$stage_log"
    fi
    stage_end
fi

# The report, in the shape of gpu_check.sh's gpu-tests.json plus the stages
# and the bench lines.
timeout 60 python3 - "$OUT" "$WORK" "$CONFIG" "$BATCH" "$STEPS" <<'PY'
import json, os, re, sys

out, work, config, batch, steps = sys.argv[1:6]


def read(path):
    try:
        with open(path, errors="replace") as f:
            return f.read()
    except OSError:
        return ""


def test_counts(log):
    """Counts over a log of test executables, each after an '=== exe' line;
    an executable with no 'test result' line crashed or ran out of time."""
    counts = {"passed": 0, "failed": 0, "ignored": 0, "skipped": 0, "incomplete": []}
    for part in re.split(r"^=== ", log, flags=re.M)[1:]:
        exe = part.split()[0] if part.split() else "?"
        results = re.findall(r"test result: \w+\. (\d+) passed; (\d+) failed; (\d+) ignored", part)
        for p, f, i in results:
            counts["passed"] += int(p)
            counts["failed"] += int(f)
            counts["ignored"] += int(i)
        # The GPU tests print 'skipped:' when they find no usable GPU.
        counts["skipped"] += len(re.findall(r"skipped:", part))
        if not results:
            counts["incomplete"].append(exe.rsplit("/", 1)[-1])
    return counts


def json_lines(path):
    rows = []
    for line in read(path).splitlines():
        try:
            rows.append(json.loads(line))
        except ValueError:
            rows.append(line)
    return rows


op = test_counts(read(f"{out}/op_tests.log"))
net = test_counts(read(f"{work}/logs/net_tests.log"))
san = read(f"{work}/logs/memcheck.log")
gpu = [s.strip() for s in read(f"{work}/gpu.txt").strip().split(",")]
commit = read(".device/commit").split()
try:
    stages = json.loads(read(f"{out}/stages.json"))
except ValueError:
    stages = None
lines = json_lines(f"{out}/bench.jsonl")
report = {
    "commit": commit[0] if commit else None,
    "dirty_tree": len(commit) > 1,
    "gpu": gpu[0] if len(gpu) == 2 else None,
    "driver": gpu[1] if len(gpu) == 2 else None,
    "config": config,
    "batch": int(batch),
    "steps": int(steps),
    "kernel_table": os.environ.get("FCD_KERNEL_TABLE"),
    "stages": stages,
    # Totals over both test stages, named as in gpu-tests.json.
    "passed": op["passed"] + net["passed"],
    "failed": op["failed"] + net["failed"],
    "skipped": op["skipped"] + net["skipped"],
    "incomplete": op["incomplete"] + net["incomplete"],
    "tests": {"op_tests": op, "net_tests": net},
    "sanitizer_errors": sum(int(m) for m in re.findall(r"ERROR SUMMARY: (\d+) error", san)),
    "sanitizer_nonzero_exits": len(re.findall(r"^--- exit (?!0 )\d+", san, flags=re.M)),
    # The lines as printed: the engine's carry "precision", the peer's "pytorch".
    "engine": [r for r in lines if not (isinstance(r, dict) and "pytorch" in r)],
    "peer": [r for r in lines if isinstance(r, dict) and "pytorch" in r],
}
with open(f"{out}/bench.json", "w") as f:
    json.dump(report, f, indent=1)
    f.write("\n")

# The reply carries only the end of the output: the short version last.
short = {k: report[k] for k in ("commit", "gpu", "passed", "failed", "skipped", "incomplete",
                                 "sanitizer_errors", "sanitizer_nonzero_exits", "kernel_table")}
short["s_per_slice"] = {r.get("precision", "?"): r.get("s_per_slice") for r in report["engine"] if isinstance(r, dict)}
short["psnr_db"] = {r.get("precision", "?"): r.get("fidelity_psnr_db") for r in report["engine"] if isinstance(r, dict)}
for r in report["peer"]:
    short["pytorch"] = r.get("pytorch")
print(json.dumps(short, indent=1))
PY
echo "report: exit $?; files in $OUT; logs in $OUT/logs.tar.gz"
