# shellcheck shell=bash
# Source this (`source .ci/env.sh`) before building so that build.rs finds
# NVRTC and the CUDA headers in the project's .venv, made with:
#   python3 -m venv .venv
#   .venv/bin/pip install nvidia-cuda-nvrtc-cu12 nvidia-cuda-runtime-cu12 nvidia-cuda-nvcc-cu12
# Exports LD_LIBRARY_PATH (libnvrtc.so.12) and FCD_CUDA_INCLUDE (headers).
# A CUDA toolkit works too: put its lib64 on LD_LIBRARY_PATH instead.

fcd_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
fcd_nvidia=""
for fcd_dir in "$fcd_root"/.venv/lib/python3*/site-packages/nvidia; do
    if [ -e "$fcd_dir/cuda_nvrtc/lib/libnvrtc.so.12" ]; then
        fcd_nvidia="$fcd_dir"
        break
    fi
done

if [ -z "$fcd_nvidia" ]; then
    echo "env.sh: no nvidia-cuda-nvrtc-cu12 wheel under $fcd_root/.venv (see the comment at the top of .ci/env.sh)" >&2
    unset fcd_root fcd_nvidia fcd_dir
    return 1
fi

# Prepended once only: a changed LD_LIBRARY_PATH makes cargo rerun build.rs.
case ":${LD_LIBRARY_PATH:-}:" in
    *":$fcd_nvidia/cuda_nvrtc/lib:"*) ;;
    *) export LD_LIBRARY_PATH="$fcd_nvidia/cuda_nvrtc/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" ;;
esac
export FCD_CUDA_INCLUDE="$fcd_nvidia/cuda_runtime/include:$fcd_nvidia/cuda_nvrtc/include:$fcd_nvidia/cuda_nvcc/include"
unset fcd_root fcd_nvidia fcd_dir
