#!/usr/bin/env bash
# The throughput report, engine and PyTorch peer in one run: runs on a GPU
# machine from the repository root, with .device/ made by tools/gpu_pack.sh
# carried along. The engine (`fcd bench`) and the PyTorch peer
# (benches/pytorch_peer.py) run the same sampler on the same GPU, one after
# the other; writes $OUT/bench.json (every time in seconds per slice) and the
# raw outputs beside it, and prints bench.json.
# The bf16 and fp16 runs also rerun fp32 on the same inputs (`--fidelity`)
# for the anomaly-map PSNR.
#   BATCH (16), STEPS (10), SKIP_COMPILE (1: leave compiled_bf16 null),
#   CONFIG (the published config), UNET / CLASSIFIER (default random weights).
set -euo pipefail
OUT=${OUT:-/tmp/bench}
BATCH=${BATCH:-16}
STEPS=${STEPS:-10}
SKIP_COMPILE=${SKIP_COMPILE:-1}
CONFIG=${CONFIG:-tests/fixtures/published/config_t1_cond_multiclass_cg.yaml}
mkdir -p "$OUT"

ckpts=()
[ -n "${UNET:-}" ] && ckpts+=(--unet "$UNET")
[ -n "${CLASSIFIER:-}" ] && ckpts+=(--classifier "$CLASSIFIER")
peer_flags=()
[ "$SKIP_COMPILE" = 1 ] && peer_flags+=(--skip-compile)

nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | head -n 1 > "$OUT/bench_gpu.txt"

for p in fp32 tf32 bf16 fp16; do
    echo "=== engine: fcd bench, $p, batch $BATCH, N = $STEPS" >&2
    fidelity=()
    [ "$p" != fp32 ] && fidelity+=(--fidelity)
    .device/fcd bench --config "$CONFIG" "${ckpts[@]}" --device cuda --precision "$p" \
        --batch "$BATCH" --steps "$STEPS" "${fidelity[@]}" --json > "$OUT/bench_engine_$p.json"
done

echo "=== PyTorch peer" >&2
PYTHONUNBUFFERED=1 python3 benches/pytorch_peer.py --config "$CONFIG" "${ckpts[@]}" --device cuda \
    --batch "$BATCH" --steps "$STEPS" "${peer_flags[@]}" > "$OUT/bench_peer.json"

python3 - "$OUT" .device/commit <<'PY'
import json, sys
out, commit_file = sys.argv[1], sys.argv[2]
engine = {
    p: json.loads(open(f"{out}/bench_engine_{p}.json").read().strip().splitlines()[-1])
    for p in ("fp32", "tf32", "bf16", "fp16")
}
peer = json.loads(open(f"{out}/bench_peer.json").read().strip().splitlines()[-1])
name, driver = (s.strip() for s in open(f"{out}/bench_gpu.txt").read().split(",", 1))
try:
    commit = " ".join(open(commit_file).read().split()) or None
except OSError:
    commit = None
for p, e in engine.items():
    if (e["batch"], e["steps"]) != (peer["batch"], peer["steps"]):
        sys.exit(f"engine {p} ran batch {e['batch']} N {e['steps']}, the peer {peer['batch']} N {peer['steps']}")
rate = peer["matmul_tflops_measured"]
report = {
    "commit": commit,
    "gpu": name,
    "driver": driver,
    "batch": peer["batch"],
    "steps": peer["steps"],
    "engine": {p: e["s_per_slice"] for p, e in engine.items()},
    "pytorch": peer["pytorch"],
    # The engine's count of the work per slice, done at the measured dense
    # bf16 matmul rate.
    "floor_s_per_slice": engine["fp32"]["tflop_per_slice"] / rate if rate else None,
    "matmul_tflops_measured": rate,
    # null: maps identical to fp32's (infinite PSNR).
    "fidelity": {f"{p}_psnr_db": engine[p].get("fidelity_psnr_db") for p in ("tf32", "bf16", "fp16")},
}
with open(f"{out}/bench.json", "w") as f:
    json.dump(report, f, indent=2)
    f.write("\n")
print(json.dumps(report, indent=2))
PY
