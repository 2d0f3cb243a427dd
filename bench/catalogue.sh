#!/usr/bin/env bash
# Seconds per training step of every experiment in experiments/ (the "Time" lines of their headers),
# with `pixel bench` on a few steps. Datasets that are not on this machine are stood in for by
# synthetic images of the same shape (the speed does not depend on the pixel values).
#
#   bash bench/catalogue.sh [PIXEL] [BACKEND] [STEPS] [DEVICE]
#
# PIXEL: the binary (default target/release/pixel); BACKEND: libtorch (default) or flex; STEPS: 3;
# DEVICE: runtime.device (default auto: the first GPU where libtorch sees one).
# Per epoch: s/step x (training images / batch size), plus a test pass of about a third of that.
set -euo pipefail
pixel=${1:-target/release/pixel}
backend=${2:-libtorch}
steps=${3:-3}
device=${4:-auto}
printf '| experiment | backend | precision | batch | s/step | images/s |\n|---|---|---|---:|---:|---:|\n'
for exp in experiments/*.toml; do
  stand_in=()
  case "$(basename "$exp")" in
    cifar10-*) stand_in=(--set data.dataset=\"synthetic\" --set data.synthetic_size=32
                         --set data.synthetic_colours=3 --set data.synthetic_images=512
                         --set data.validation=0) ;;
    imagenet64-*) stand_in=(--set data.dataset=\"synthetic\" --set data.synthetic_size=64
                            --set data.synthetic_colours=3 --set data.synthetic_images=256
                            --set data.validation=0) ;;
  esac
  line=$("$pixel" bench "$exp" --steps "$steps" --no-grid --set runtime.backend="$backend" --set runtime.device="$device" \
    "${stand_in[@]}" 2>&1 | grep '^| ' | tail -1) || line="| $(basename "$exp" .toml) | failed |"
  echo "$line" | cut -d'|' -f1-7 | sed 's/$/|/'
done
