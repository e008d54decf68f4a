# shellcheck shell=bash
# Sourced, not run, by tools/gpu_check.sh and tools/device_run.sh on a
# GPU machine, from the repository root, once the .device/ of
# tools/gpu_pack.sh is unpacked there. It changes no shell option and leaves
# no variable behind.
#
# The test executables carry absolute paths of the checkout they were built
# in (env!("CARGO_MANIFEST_DIR") for tests/fixtures and kernels/,
# CARGO_BIN_EXE_fcd for target/release/fcd), which gpu_pack.sh recorded in
# .device/build_root. The tests take no other way to find them, so that
# path is made a symbolic link to this checkout when it does not exist here.
fcd_build_root=$(cat .device/build_root 2>/dev/null || true)
if [ -z "$fcd_build_root" ]; then
    echo "${0##*/}: .device/build_root missing (pack with tools/gpu_pack.sh); fixture paths may not resolve" >&2
elif [ "$fcd_build_root" != "$(pwd -P)" ]; then
    if [ ! -e "$fcd_build_root" ]; then
        mkdir -p "$(dirname "$fcd_build_root")" && ln -sfn "$PWD" "$fcd_build_root"
    elif [ ! -e "$fcd_build_root/tests/fixtures" ]; then
        echo "${0##*/}: $fcd_build_root exists but holds no tests/fixtures; fixture tests will fail" >&2
    fi
fi
unset fcd_build_root
# Where CARGO_BIN_EXE_fcd points once the link above is made.
mkdir -p target/release && cp .device/fcd target/release/fcd
