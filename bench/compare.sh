#!/usr/bin/env bash
# The performance table of docs/performance.md, measured back to back: the PyTorch script of the same model and
# `pixel bench`, pair by pair, on the same threads. Run from the repository root on a quiet machine:
#
#   bash bench/compare.sh [PIXEL] [ROUNDS]
#
# PIXEL: a `pixel` binary built with --features tch (default: target/release/pixel).
# ROUNDS: how many times each pair runs, alternating (default 3); each line is one measurement.
# The VM this was written on drifts 10-20 % over minutes: compare within a round.
set -euo pipefail
pixel=${1:-target/release/pixel}
rounds=${2:-3}
steps=15
exp=experiments/quickstart.toml
model=(--set model.variant=gated --set train.batch_size=64)
torch=(python3 bench/pytorch_reference.py --variant gated --batch 64 --threads 2 --steps "$steps")
# glibc settings that keep freed memory in the heap: what `pixel` sets for itself at start-up.
malloc=(MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=1073741824 MALLOC_TOP_PAD_=268435456)

row() { printf '%-44s %s\n' "$1" "$2"; }
px() { "$pixel" bench "$exp" "${model[@]}" --steps "$steps" "$@" 2>/dev/null | grep '^| quickstart'; }
pt() { "${torch[@]}" "$@" 2>/dev/null | grep '^| pytorch'; }

for r in $(seq "$rounds"); do
  echo "--- round $r ($(date -u +%H:%M:%S))"
  for precision in f32 bf16; do
    row "pytorch $precision" "$(pt --precision "$precision")"
    row "pytorch $precision, pixel's malloc settings" "$(env "${malloc[@]}" "${torch[@]}" --precision "$precision" 2>/dev/null | grep '^| pytorch')"
    row "pixel libtorch $precision" "$(px --set runtime.backend=libtorch --set runtime.precision="$precision" --no-grid)"
  done
done
echo "--- once: sampling, f16 and the pure-Rust backend"
row "pixel libtorch f32 with the 12x12 grid" "$(px --set runtime.backend=libtorch)"
row "pixel libtorch f16" "$(px --set runtime.backend=libtorch --set runtime.precision=f16 --no-grid)"
for precision in f32 bf16 f16; do
  grid=--no-grid
  [ "$precision" = f32 ] && grid=
  row "pixel flex $precision" "$(px --set runtime.backend=flex --set runtime.precision="$precision" $grid)"
done
