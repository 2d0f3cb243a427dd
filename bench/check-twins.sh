#!/usr/bin/env bash
# pixel against an independent implementation. For every model the PyTorch twins of this folder
# implement (simple, gated with its ablations, class-conditional, PixelCNN++ with the mixture and the
# categorical, grey and RGB): train a smoke run, `pixel eval` it, `pixel export` it with its whole
# test split, and check with bench/pixel_twins.py that the twin, in float64, gives each factor of
# every test image (sub-pixel or, under the mixture, pixel) and the test bits/dim of `pixel eval`
# within 1e-4 of pixel's. Needs python3 with torch, numpy and safetensors. CI runs it.
#
#   bash bench/check-twins.sh [PIXEL_BINARY [WORK_DIR]]
set -euo pipefail
cd "$(dirname "$0")/.."
pixel=${1:-target/debug/pixel}
work=${2:-$(mktemp -d)}
mkdir -p "$work"

# Variants no smoke experiment covers, as experiment files of their own.
cat > "$work/gated-ablations.toml" <<'TOML'
description = "gated PixelCNN without residual, gates or link, synthetic rgb 8x8"
[model]
variant = "gated"
layers = 2
kernel = 3
channels = 6
residual = false
gates = false
link = false
[data]
dataset = "synthetic"
synthetic_colours = 3
[train]
epochs = 1
[sample]
grid = 2
TOML
cat > "$work/pixelcnnpp-rgb-categorical.toml" <<'TOML'
description = "PixelCNN++ with 256 logits per colour (the in-pixel head), synthetic rgb 8x8"
[model]
variant = "pixelcnnpp"
channels = 6
likelihood = "categorical"
[model.pixelcnnpp]
resnets = 1
dropout = 0.5
[data]
dataset = "synthetic"
synthetic_colours = 3
synthetic_size = 8
[train]
epochs = 1
[sample]
grid = 2
TOML

failed=0
check() {  # check LABEL EXPERIMENT [--set KEY=VALUE ...]
  local label=$1 exp=$2
  shift 2
  local dir
  dir="$work/$label/$(basename "$exp" .toml)"
  echo "--- $label: $exp $*"
  "$pixel" run "$exp" --results "$work/$label" "$@" > "$work/$label.log" 2>&1 ||
    { cat "$work/$label.log"; return 1; }
  "$pixel" eval "$dir" > /dev/null
  "$pixel" export "$dir" --test-images all > /dev/null
  local weights="$dir/model.safetensors"
  # pixel eval (and so the log-probs) use the average where the run keeps one.
  [ -f "$dir/model-ema.safetensors" ] && weights="$dir/model-ema.safetensors"
  local bits
  bits=$(python3 -c 'import json, sys; print(json.load(open(sys.argv[1]))["test_bits_per_dim"])' \
    "$dir/eval.json")
  python3 bench/pixel_twins.py "$weights" --images "$dir/test-images.npy" \
    --labels "$dir/test-labels.npy" --log-probs "$dir/test-log-probs.npy" --expect-bits "$bits" ||
    failed=1
}

check simple-grey experiments/smoke/synthetic-grey.toml
check simple-rgb experiments/smoke/synthetic-rgb.toml
check gated-grey experiments/smoke/gated-synthetic-grey.toml
check gated-rgb experiments/smoke/gated-synthetic-rgb.toml
check gated-ablations "$work/gated-ablations.toml"
check gated-conditional experiments/smoke/conditional-mnist-sample-crop.toml
check gated-grey-mixture experiments/smoke/gated-mnist-logistic.toml
check simple-grey-mixture experiments/smoke/synthetic-grey.toml \
  --set 'model.likelihood="logistic_mixture"' --set model.mixtures=3
check pixelcnnpp-rgb-mixture experiments/smoke/pixelcnnpp-synthetic-rgb.toml --set train.epochs=1
check pixelcnnpp-grey-mixture experiments/smoke/pixelcnnpp-mnist-categorical.toml \
  --set 'model.likelihood="logistic_mixture"' --set model.mixtures=3 --set model.conditional='"class"'
check pixelcnnpp-grey-categorical experiments/smoke/pixelcnnpp-mnist-categorical.toml
check pixelcnnpp-rgb-categorical "$work/pixelcnnpp-rgb-categorical.toml"
if [ "$failed" != 0 ]; then
  echo "pixel and its PyTorch twin disagree (above): a bug in one of the two"
  exit 1
fi
echo "every exported model gives pixel's numbers in its PyTorch twin"
