#!/usr/bin/env bash
# Every GPU measurement of the README in one run, on a CUDA machine with PyTorch installed: the gated
# 5x5 model of the performance table on libtorch CUDA (f32, bf16, f16; training step, forward pass,
# cached and naive 12x12 grids), the PyTorch reference on the same GPU, every catalogue experiment's
# step time, then as many MNIST catalogue runs as the time left allows (stopped with SIGINT at the
# deadline, so each keeps a checkpoint and continues with `pixel run --resume`).
#
#   bash bench/gpu.sh [PIXEL] [SECONDS]
#
# PIXEL: a `pixel` built with --features tch against the libtorch of the machine's PyTorch
#        (default target/gpu/pixel, made by `bash bench/gpu-build.sh`); it finds libtorch through
#        LD_LIBRARY_PATH, set here from `python3 -c 'import torch'`.
# SECONDS: the time budget (default 480); the training runs get what the measurements leave.
# MNIST: data/mnist/ (the four official files; bench/gpu-build.sh copies them there).
# Output in OUT (default gpu-out/): gpu.txt (everything printed), results.tar.gz (the runs).
# A dry run of the whole script on a CPU: DEVICE=cpu STEPS=2 bash bench/gpu.sh PIXEL 120
set -uo pipefail
cd "$(dirname "$0")/.."
pixel=${1:-target/gpu/pixel}
budget=${2:-480}
out=${OUT:-gpu-out}
device=${DEVICE:-cuda}
steps=${STEPS:-30}
mkdir -p "$out"
deadline=$((SECONDS + budget))
exec > >(tee "$out/gpu.txt") 2>&1

torch_lib=$(python3 -c 'import os, torch; print(os.path.join(os.path.dirname(torch.__file__), "lib"))')
export LD_LIBRARY_PATH="$torch_lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export RUST_LOG=${RUST_LOG:-info}
section() { printf '\n=== %s (%s, %d s left)\n' "$*" "$(date -u +%H:%M:%S)" $((deadline - SECONDS)); }

section "machine"
date -u +%Y-%m-%d
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || echo "no nvidia-smi"
python3 -c 'import torch; print("pytorch", torch.__version__, "cuda", torch.version.cuda)'
"$pixel" --version

section "pixel bench: gated 5x5, 30 channels, batch 64, 28x28 (the README's performance table)"
model=(experiments/quickstart.toml --set model.variant=gated --set train.batch_size=64 --steps "$steps"
       --set runtime.backend=libtorch --set runtime.device="$device")
naive=--naive-grid
[ "$device" = cpu ] && naive=
"$pixel" bench "${model[@]}" $naive
for precision in bf16 f16; do
  "$pixel" bench "${model[@]}" --set runtime.precision=$precision
done

section "PyTorch reference, same model, same GPU"
for precision in f32 bf16; do
  python3 bench/pytorch_reference.py --variant gated --batch 64 --steps "$steps" --device "$device" \
    --precision $precision
done

section "every catalogue experiment (bench/catalogue.sh: 5 steps, CIFAR-10 and imagenet64 synthetic)"
bash bench/catalogue.sh "$pixel" libtorch "$steps" "$device"

section "MNIST catalogue runs until the deadline"
for exp in mnist-gated-5x5 mnist-conditional-5x5 mnist-vae-5x5 mnist-simple-9x5 mnist-gated-9x5-50ep; do
  left=$((deadline - SECONDS - 15))
  [ "$left" -lt 30 ] && { echo "no time left for $exp"; continue; }
  echo "--- $exp (at most $left s)"
  timeout -s INT -k 30 "$left" "$pixel" run "experiments/$exp.toml" \
    --set runtime.backend=libtorch --set runtime.device="$device"
  echo "--- $exp: exit $?"
done

section "packing results/"
tar czf "$out/results.tar.gz" --exclude=README.md results
ls -la "$out"
