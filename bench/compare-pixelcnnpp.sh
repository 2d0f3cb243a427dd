#!/usr/bin/env bash
# PixelCNN++ beside its PyTorch twin (bench/pytorch_pixelcnnpp.py, the same layout and parameter count),
# pair by pair on the same threads, with glibc's malloc settings that `pixel` sets for itself given to
# PyTorch too. The model is experiments/mnist-pixelcnnpp.toml (32 filters, 2 resnets per stage,
# 5 logistics, 28x28 grey, batch 64), with its dropout (0.5) and without. Run on a quiet machine:
#
#   bash bench/compare-pixelcnnpp.sh [PIXEL] [ROUNDS] [STEPS]
#
# PIXEL: a `pixel` binary built with --features tch (default: target/release/pixel); ROUNDS: 2; STEPS: 8.
# ONCE=0 leaves out the last part (the grid, about 7 minutes, and flex).
set -euo pipefail
pixel=${1:-target/release/pixel}
rounds=${2:-2}
steps=${3:-8}
exp=experiments/mnist-pixelcnnpp.toml
# The twin trains on random images; pixel on the bundled MNIST sample (speed does not depend on values).
# The twin keeps no EMA of its weights: neither does pixel here (train.ema = 0; with it, add the
# average's update, a few ms per step).
data=(--set 'data.path="../assets/mnist-sample"' --set data.validation=0 --set train.ema=0.0)
malloc=(MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=1073741824 MALLOC_TOP_PAD_=268435456)
twin=(python3 bench/pytorch_pixelcnnpp.py --colours 1 --size 28 --filters 32 --resnets 2 --mixtures 5
      --batch 64 --threads 2 --steps "$steps")
row() { printf '%-40s %s\n' "$1" "$2"; }
# Each measurement: its table row, then where its step's time went (both print the same phases).
both() { grep -E '^\| (pytorch|mnist)|^step phases' | sed '2s/^/  /' | paste -sd' '; }
echo "| run | batch | s/step | train images/s | forward ms | peak MiB | step phases (median ms)"
for r in $(seq "$rounds"); do
  echo "--- round $r ($(date -u +%H:%M:%S))"
  for dropout in 0.5 0.0; do
    row "pytorch, dropout $dropout" "$(env "${malloc[@]}" "${twin[@]}" --dropout "$dropout" 2>/dev/null | both)"
    row "pixel libtorch, dropout $dropout" "$("$pixel" bench "$exp" "${data[@]}" --steps "$steps" --no-grid \
      --set runtime.backend=libtorch --set model.pixelcnnpp.dropout="$dropout" 2>/dev/null | both)"
  done
done
[ "${ONCE:-1}" = 0 ] && exit 0
echo "--- once: the 12x12 grid (PixelCNN++ has no cached sampler) and flex"
row "pixel libtorch, with the grid" "$("$pixel" bench "$exp" "${data[@]}" --steps 2 --set runtime.backend=libtorch 2>/dev/null | grep '^| mnist')"
row "pixel flex" "$("$pixel" bench "$exp" "${data[@]}" --steps 2 --no-grid --set runtime.backend=flex 2>/dev/null | grep '^| mnist')"
