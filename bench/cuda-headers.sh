#!/usr/bin/env bash
# Installs the CUDA headers that a PyTorch wheel with CUDA lacks for compiling against its libtorch
# (the runtime's `crt/` folder), beside that PyTorch, so that build.rs compiles CUDA graphs into
# src/native/torch_extras.cpp (`runtime.cuda_graph`). Nothing for a PyTorch without CUDA.
#
#   bash bench/cuda-headers.sh            # for python3's PyTorch; PYTHON=... for another
#
# CUDA 12 wheels: nvcc's wheel (nvidia/cuda_nvcc/include/crt); CUDA 13: nvidia-cuda-crt.
set -euo pipefail
python=${PYTHON:-python3}
cuda=$("$python" -c 'import torch; print(torch.version.cuda or "")')
case "$cuda" in
  "") echo "this PyTorch has no CUDA: no headers needed"; exit 0 ;;
  12.*) package="nvidia-cuda-nvcc-cu12==$cuda.*" ;;
  13.*) package="nvidia-cuda-crt==$cuda.*" ;;
  *) echo "CUDA $cuda: expected 12.x or 13.x (set CUDA_HOME to a CUDA toolkit instead)" >&2; exit 1 ;;
esac
"$python" -m pip install --quiet --no-deps "$package"
echo "installed $package for PyTorch's CUDA $cuda"
