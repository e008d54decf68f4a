"""Compile one kernels/*.cu with NVRTC for sm_90 and print ptxas's register /
spill report per kernel (no GPU needed). Run after `source .ci/env.sh`:
    python3 tools/ptxas_info.py kernels/igemm.cu
"""
import ctypes
import os
import sys

nvrtc = ctypes.CDLL("libnvrtc.so.12")
src = open(sys.argv[1], "rb").read()
arch = sys.argv[2] if len(sys.argv) > 2 else "sm_90"
prog = ctypes.c_void_p()
assert nvrtc.nvrtcCreateProgram(ctypes.byref(prog), src, sys.argv[1].encode(), 0, None, None) == 0
opts = [f"--gpu-architecture={arch}", "--std=c++17", "--ptxas-options=-v"]
# kernels/common/ first, as build.rs passes it.
opts += [f"--include-path={os.path.join(os.path.dirname(os.path.abspath(__file__)), '..', 'kernels', 'common')}"]
opts += [f"--include-path={p}" for p in os.environ.get("FCD_CUDA_INCLUDE", "").split(":") if p]
arr = (ctypes.c_char_p * len(opts))(*[o.encode() for o in opts])
rc = nvrtc.nvrtcCompileProgram(prog, len(opts), arr)
size = ctypes.c_size_t()
nvrtc.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
log = ctypes.create_string_buffer(size.value)
nvrtc.nvrtcGetProgramLog(prog, log)
print(log.value.decode(errors="replace"))
sys.exit(rc)
