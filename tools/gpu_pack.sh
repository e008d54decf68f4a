#!/usr/bin/env bash
# Builds the release binary (with the lab: the kernel tournament), the test
# executables and the GPU benches with kernels, copies them stripped into
# .device/ (git-ignored), and packs that into .device.tar.xz for a GPU machine
# that does not build: every executable embeds the same kernel images, which
# xz's 64 MiB window stores once, so the archive is a fraction of the folder.
# Works from a fresh clone (it installs NVRTC into .venv). On the GPU machine,
# in a checkout of the same commit (docs/gpu.md):
#   tar xJf .device.tar.xz && bash tools/device_run.sh   (or tools/gpu_check.sh)
set -euo pipefail
cd "$(dirname "$0")/.."
bash .ci/cuda_wheels.sh
source .ci/env.sh
export FCD_REQUIRE_KERNELS=1
rm -rf .device && mkdir -p .device/tests
cargo build --release --bins --features lab
cp target/release/fcd .device/fcd
cargo test --release --no-run --message-format=json |
    python3 -c '
import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["kind"] != ["bin"]:
        print(m["target"]["name"], m["executable"])
' | while read -r name exe; do strip -o ".device/tests/$name" "$exe"; done
cargo bench --no-run --message-format=json |
    python3 -c '
import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and "bench" in m["target"]["kind"]:
        print(m["target"]["name"], m["executable"])
' | while read -r name exe; do strip -o ".device/bench_$name" "$exe"; done
strip .device/fcd
git rev-parse HEAD > .device/commit
# The test executables find their fixtures and the fcd binary through paths
# cargo fixed at build time (env!("CARGO_MANIFEST_DIR"),
# CARGO_BIN_EXE_fcd), i.e. under this checkout; tools/device_env.sh makes
# this path lead to the unpacked copy on the GPU machine.
pwd -P > .device/build_root
# Untracked sources count: a new kernel file is a change like any other.
[ -z "$(git status --porcelain -- src kernels tests benches build.rs Cargo.toml Cargo.lock)" ] ||
    echo "dirty" >> .device/commit
tar -cf - .device | xz -T0 -9 > .device.tar.xz
du -sh .device .device.tar.xz
