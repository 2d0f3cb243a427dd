#!/usr/bin/env bash
# Prepares a GPU run of bench/gpu.sh on another machine: builds `pixel` with --features tch against the
# libtorch of the PyTorch version installed there, so that the binary runs on that machine's own
# libtorch (its CUDA libraries included) without shipping gigabytes of it.
#
#   bash bench/gpu-build.sh TORCH_VERSION [MNIST_DIR]
#
# TORCH_VERSION: the GPU machine's `python3 -c 'import torch; print(torch.__version__)'`, without the
#   "+cu..." suffix (pip's default Linux wheel of a version is built for one CUDA: use the same there).
# MNIST_DIR: a folder with the four official MNIST files, copied into data/mnist/ for the runs.
# Installs torch==TORCH_VERSION with pip into VENV (default target/torch-VERSION/venv; about 7 GiB),
# builds into target/torch-VERSION/ and copies the stripped binary to target/gpu/pixel. burn-tch 0.22
# expects libtorch 2.9.0: other versions build with LIBTORCH_BYPASS_VERSION_CHECK, and this script runs
# the libtorch tests against them on the CPU before it hands the binary over.
set -euo pipefail
cd "$(dirname "$0")/.."
version=${1:?usage: bash bench/gpu-build.sh TORCH_VERSION [MNIST_DIR]}
mnist=${2:-}
venv=${VENV:-target/torch-$version/venv}
if [ ! -x "$venv/bin/python" ]; then
  python3 -m venv "$venv"
fi
if ! "$venv/bin/python" -c "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '$version')" 2>/dev/null; then
  "$venv/bin/python" -m pip install --quiet "torch==$version"
fi
venv=$(cd "$venv" && pwd)
export VIRTUAL_ENV=$venv PATH=$venv/bin:$PATH LIBTORCH_USE_PYTORCH=1 LIBTORCH_BYPASS_VERSION_CHECK=1
export CARGO_TARGET_DIR=target/torch-$version
torch_lib=$(python -c 'import os, torch; print(os.path.join(os.path.dirname(torch.__file__), "lib"))')
export LD_LIBRARY_PATH="$torch_lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
# The CUDA headers its wheel lacks, for CUDA graphs (runtime.cuda_graph); a test checks they compiled in.
PYTHON=python bash bench/cuda-headers.sh
export PIXEL_EXPECT_CUDA_GRAPHS=1
cargo build --release --features tch
# The libtorch tests (causality, units, native operations' values and gradients) on this libtorch.
cargo test --release --features tch --lib
mkdir -p target/gpu
strip -o target/gpu/pixel "$CARGO_TARGET_DIR/release/pixel"
if [ -n "$mnist" ]; then
  mkdir -p data/mnist
  cp "$mnist"/*-ubyte.gz data/mnist/
fi
ls -la target/gpu/pixel
echo "ready: carry target/gpu (and data/mnist for MNIST runs), then run: bash bench/gpu.sh target/gpu/pixel"
