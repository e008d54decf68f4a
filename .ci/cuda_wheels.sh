#!/usr/bin/env bash
# NVRTC and the CUDA headers from NVIDIA's Python wheels, into the project's .venv (made if
# missing): what build.rs needs to compile the kernels, on machines with or without a GPU.
# 12.6 matches cudarc's cuda-12060 feature. Its CUBIN loads on any driver from CUDA 12.0 up,
# its PTX (ISA 8.5) on drivers from 12.5 up. Then `source .ci/env.sh`.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi
.venv/bin/python -m pip install --quiet --disable-pip-version-check \
    nvidia-cuda-nvrtc-cu12==12.6.85 \
    nvidia-cuda-runtime-cu12==12.6.77 \
    nvidia-cuda-nvcc-cu12==12.6.85
