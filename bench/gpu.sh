#!/usr/bin/env bash
# pixel beside its PyTorch twins on one CUDA GPU, in under 10 minutes: the table of the performance
# docs, determinism checks and profiles. Each row runs pixel, then the twin doing the same work (a
# fresh batch uploaded every step, the loss and the gradients' norm read on the host every step, the
# EMA where the experiment has one), at the same precision, cuDNN and cuBLAS at ATen's defaults on
# both sides (cuDNN may use TF32 for convolutions; matmuls stay FP32); rounds interleave the two.
#
#   bash bench/gpu.sh [PIXEL] [SECONDS]
#
# PIXEL: a `pixel` built with --features tch against the machine's PyTorch (default target/gpu/pixel,
#        made by `bash bench/gpu-build.sh VERSION`); LD_LIBRARY_PATH is set here from `import torch`.
# SECONDS: the budget (default 540); a row that would start past it is skipped, and said. The rows
#   of round 1 leave RESERVE seconds (default 240) for the determinism checks and the profiles,
#   later rounds PROFILE_RESERVE (140) for the profiles. Each command is killed after ROW_TIMEOUT
#   seconds (default 150), and its row says so.
# In this order:
# 1. Round 1 of the rows: gated 5x5 c30 (experiments/quickstart.toml as a gated model) at batch 64,
#    256, 1024 in f32 and 64 in bf16; PixelCNN++ with the CIFAR-10 settings
#    (experiments/cifar10-pixelcnnpp.toml on synthetic 32x32 RGB images) at batch 16 with dropout 0.5
#    and 0, at 64 in f32 and bf16, and 16 with cuDNN's benchmarking on both sides
#    (runtime.cudnn_benchmark, the twin's --cudnn-benchmark). Rows marked `graph` run pixel's step
#    as a CUDA graph (runtime.cuda_graph), gated b64 in f16 too (its skips decided on the device);
#    the twin of gated b64 f32's is compiled (torch.compile's "reduce-overhead", CUDA graphs too;
#    round 1 only), the others' are the eager rows of their batch.
# 2. Determinism: a 20-step PixelCNN++ run (experiments/smoke/pixelcnnpp-synthetic-rgb.toml) twice
#    with runtime.deterministic = true (the metrics and the checkpoint's bytes must be equal), and a
#    third time as a CUDA graph (the same bytes again: a replay runs the captured kernels), then
#    twice with the default (false: libtorch's defaults, as the twins); then a class-conditional
#    gated run (experiments/smoke/conditional-mnist-sample-crop.toml: the 256-way loss) twice with
#    true.
# 3. The other rounds of the rows, then their table for the performance docs (bench/gpu_table.py,
#    which also reads a gpu.txt afterwards).
# 4. The phases synchronised at each boundary and a profile of 3 steps of gated b64 and PixelCNN++
#    b16, each side's (profile_summary.py: kernels, GPU time and busy share, host waits per step).
# Output in OUT (default gpu-out/): gpu.txt, everything printed.
# A dry run on a CPU (python3 with torch on PATH):
#   DEVICE=cpu STEPS=2 ROUNDS=1 GATED_ROWS="8 f32" PP_ROWS="2 0.5 f32" bash bench/gpu.sh target/gpu/pixel 600
set -uo pipefail
cd "$(dirname "$0")/.."
pixel=${1:-target/gpu/pixel}
budget=${2:-540}
out=${OUT:-gpu-out}
device=${DEVICE:-cuda}
steps=${STEPS:-12}
rounds=${ROUNDS:-2}
# Seconds the rows of round 1 leave for the determinism checks and the profiles after them, and
# the rows of later rounds for the profiles.
reserve=${RESERVE:-240}
profile_reserve=${PROFILE_RESERVE:-140}
# Rows as "batch precision [graph]" and "batch dropout precision [benchmark|graph]", one per word
# group (';'-separated).
IFS=';' read -r -a gated_rows <<< "${GATED_ROWS:-64 f32;64 f32 graph;256 f32;1024 f32;64 bf16;64 f16 graph}"
IFS=';' read -r -a pp_rows <<< "${PP_ROWS:-16 0.5 f32;16 0.5 f32 graph;16 0.0 f32;64 0.5 f32;64 0.5 bf16;16 0.5 f32 benchmark}"
mkdir -p "$out"
deadline=$((SECONDS + budget))
exec > >(tee "$out/gpu.txt") 2>&1

torch_lib=$(python3 -c 'import os, torch; print(os.path.join(os.path.dirname(torch.__file__), "lib"))')
export LD_LIBRARY_PATH="$torch_lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export RUST_LOG=${RUST_LOG:-warn}
section() { printf '\n=== %s (%s, %d s left)\n' "$*" "$(date -u +%H:%M:%S)" $((deadline - SECONDS)); }
time_left() { [ $((deadline - SECONDS)) -gt "$1" ] || { echo "skipped (budget): $2"; return 1; }; }

section "machine"
date -u +%Y-%m-%d
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || echo "no nvidia-smi"
python3 -c 'import torch; print("pytorch", torch.__version__, "cuda", torch.version.cuda,
  "cudnn.allow_tf32", torch.backends.cudnn.allow_tf32, "matmul.allow_tf32", torch.backends.cuda.matmul.allow_tf32)'
"$pixel" --version

# Runs a command of a row (under ROW_TIMEOUT seconds, default 150, then killed: a hang costs one
# row, not the machine's time) and prints its table row and step phases on one line, or why there
# are none.
row_timeout=${ROW_TIMEOUT:-150}
row() {
  local log rc lines
  log=$(timeout -k 10 "$row_timeout" "$@" 2>&1); rc=$?
  lines=$(grep -E '^\| |^step phases|CUDA graph|cuda_graph' <<< "$log" |
    grep -v -e '^| experiment' -e '^|---' | paste -sd' ')
  if [ "$rc" = 124 ] || [ "$rc" = 137 ]; then
    lines="$lines TIMED OUT after $row_timeout s: $(grep -v '^ ' <<< "$log" | tail -2 | paste -sd' ')"
  elif [ "$rc" != 0 ] && [ -n "$lines" ]; then
    lines="$lines FAILED (exit $rc)"
  elif [ "$rc" != 0 ] || [ -z "$lines" ]; then
    lines="FAILED (exit $rc): $(grep -v '^ ' <<< "$log" | tail -2 | paste -sd' ')"
  fi
  echo "$lines"
}
# pixel's row and step phases.
pixel_row() {
  row "$pixel" bench "$@" --steps "$steps" --no-grid --set runtime.backend=libtorch \
    --set runtime.device="$device"
}
twin_gated=(python3 bench/pytorch_reference.py --variant gated --device "$device" --steps "$steps" --threads 4)
gated=(experiments/quickstart.toml --set model.variant=gated --set data.validation=0)
cifar=(experiments/cifar10-pixelcnnpp.toml --set 'data.dataset="synthetic"' --set data.synthetic_size=32
       --set data.synthetic_colours=3 --set data.synthetic_images=1024 --set data.validation=0)
twin_pp=(python3 bench/pytorch_pixelcnnpp.py --colours 3 --size 32 --filters 160 --resnets 5 --mixtures 10
         --ema 0.9995 --device "$device" --steps "$steps" --threads 4)
# Twice with runtime.deterministic = true (must repeat to the bit), then twice with the default;
# the PixelCNN++ run (logistic mixture, dropout) a third time as a CUDA graph, and a class-
# conditional gated model (the 256-way loss, the class biases' index_add) with the flag too.
sums() { (cd "$1"/*/checkpoints && find . -type f -name '*.bpk' | sort | xargs sha256sum); }
# det_run NAME EXPERIMENT DETERMINISTIC GRAPH [--set ...]: one run into $out/NAME, its metrics'
# columns in $out/NAME.csv.
det_run() {
  local name=$1 experiment=$2 det=$3 graph=$4; shift 4
  rm -rf "${out:?}/$name"
  RUST_LOG=info timeout -k 10 "$row_timeout" "$pixel" run "$experiment" --results "$out/$name" \
    --set runtime.backend=libtorch --set runtime.device="$device" --set runtime.deterministic="$det" \
    --set runtime.cuda_graph="$graph" "$@" > "$out/$name.log" 2>&1 ||
    echo "$name failed: $(tail -3 "$out/$name.log")"
  cut -d, -f2,3,13- "$out/$name"/*/metrics.csv > "$out/$name.csv"
}
# same NAME1 NAME2 WHAT: whether two runs wrote the same metrics and checkpoint bytes.
same() {
  if cmp -s "$out/$1.csv" "$out/$2.csv" && [ "$(sums "$out/$1")" = "$(sums "$out/$2")" ]; then
    echo "$3: the same metrics and checkpoint bytes ($(sums "$out/$1" | wc -l) files)"
  else
    echo "$3: DIFFERENT:"; diff "$out/$1.csv" "$out/$2.csv"; sums "$out/$1"; sums "$out/$2"
  fi
}
determinism() {
  pp=experiments/smoke/pixelcnnpp-synthetic-rgb.toml
  pp_sets=(--set train.epochs=1 --set data.synthetic_images=320 --set train.batch_size=16)
  for det in true false; do
    section "determinism: the same 20-step PixelCNN++ run twice on the GPU, runtime.deterministic = $det"
    time_left 60 "determinism ($det)" || continue
    det_run "det-$det-1" "$pp" "$det" false "${pp_sets[@]}"
    det_run "det-$det-2" "$pp" "$det" false "${pp_sets[@]}"
    if [ "$det" = true ] && [ "$device" != cpu ]; then
      det_run "det-$det-graph" "$pp" "$det" true "${pp_sets[@]}"
      grep -h "cuda_graph" "$out/det-$det-graph.log" | tail -2
      if grep -q "runtime.cuda_graph = true; set it" "$out/det-$det-graph.log"; then
        echo "the capture failed: once more with the operators it ran written out (PIXEL_GRAPH_TRACE)"
        PIXEL_GRAPH_TRACE="$out/capture-trace.txt" det_run det-graph-trace "$pp" false true \
          "${pp_sets[@]}"
        grep -v '^[+-] ' "$out/capture-trace.txt" | tail -15
      fi
      same "det-$det-1" "det-$det-graph" "as a CUDA graph against eager"
    fi
    cat "$out/det-$det-1.csv"
    same "det-$det-1" "det-$det-2" "the same run twice (runtime.deterministic = $det)"
  done
  section "determinism: a class-conditional gated model (the 256-way loss) twice, runtime.deterministic = true"
  if time_left 30 "determinism (gated)"; then
    det_run det-gated-1 experiments/smoke/conditional-mnist-sample-crop.toml true false
    det_run det-gated-2 experiments/smoke/conditional-mnist-sample-crop.toml true false
    cat "$out/det-gated-1.csv"
    same det-gated-1 det-gated-2 "the gated run twice (runtime.deterministic = true)"
  fi
}

for r in $(seq "$rounds"); do
  section "round $r of $rounds: gated 5x5 c30, 28x28 grey"
  for row in "${gated_rows[@]}"; do
    set -- $row
    time_left $((40 + reserve)) "gated b$1 $2 ${3:-}" || continue
    echo "--- gated b$1 $2 ${3:-}"
    if [ "${3:-}" = graph ]; then
      echo "pixel: $(pixel_row "${gated[@]}" --set train.batch_size="$1" --set runtime.precision="$2" \
        --set runtime.cuda_graph=true)"
      if [ "$2" = f16 ]; then
        echo "twin:  (none in f16: the eager rows of this batch are the comparison)"
      elif [ "$r" = 1 ]; then
        # The higher anchor: the twin under torch.compile(mode="reduce-overhead"), which replays
        # its step as CUDA graphs too (round 1 only: compiling takes a minute).
        echo "twin:  $(row "${twin_gated[@]}" --batch "$1" --precision "$2" --compile)"
      else
        echo "twin:  (compiled: round 1)"
      fi
      continue
    fi
    echo "pixel: $(pixel_row "${gated[@]}" --set train.batch_size="$1" --set runtime.precision="$2")"
    echo "twin:  $(row "${twin_gated[@]}" --batch "$1" --precision "$2")"
  done
  section "round $r of $rounds: PixelCNN++ CIFAR-10 settings (53.6M parameters), 32x32 RGB, EMA 0.9995"
  for row in "${pp_rows[@]}"; do
    set -- $row
    time_left $((90 + reserve)) "pixelcnn++ b$1 dropout $2 $3 ${4:-}" || continue
    echo "--- pixelcnn++ b$1 dropout $2 $3 ${4:-}"
    bench_pixel=(); bench_twin=()
    [ "${4:-}" = benchmark ] && bench_pixel=(--set runtime.cudnn_benchmark=true) && bench_twin=(--cudnn-benchmark)
    [ "${4:-}" = graph ] && bench_pixel=(--set runtime.cuda_graph=true)
    echo "pixel: $(pixel_row "${cifar[@]}" --set train.batch_size="$1" --set model.pixelcnnpp.dropout="$2" \
      --set runtime.precision="$3" "${bench_pixel[@]}")"
    if [ "${4:-}" = graph ]; then echo "twin:  (eager: the row above)"; continue; fi
    echo "twin:  $(row "${twin_pp[@]}" --batch "$1" --dropout "$2" --precision "$3" "${bench_twin[@]}")"
  done
  if [ "$r" = 1 ]; then
    # What a second round cannot tell: whether runs repeat, and a CUDA graph's against eager.
    determinism
    reserve=$profile_reserve
  fi
done

section "the table of the rows above (bench/gpu_table.py), for the performance docs"
sleep 1  # tee's copy of the rows reaches gpu.txt
python3 bench/gpu_table.py "$out/gpu.txt"

# Where the time goes: phases synchronised at each boundary (--sync on both sides) and 3 steps
# under the profiler (--profile), pixel's trace beside the twin's (bench/profile_summary.py).
summarise() {
  if [ -f "$1" ] && [ -f "$2" ]; then python3 bench/profile_summary.py "$@"; else echo "no profile to compare"; fi
}
section "profiles: gated b64 f32 and PixelCNN++ b16 dropout 0.5 f32, phases synchronised"
if time_left 60 "gated profile"; then
  echo "pixel: $(pixel_row "${gated[@]}" --set train.batch_size=64 --sync --profile "$out/gated-pixel.json")"
  echo "twin:  $(row "${twin_gated[@]}" --batch 64 --sync --profile "$out/gated-twin.json")"
  summarise "$out/gated-pixel.json" "$out/gated-twin.json" --top 20
fi
if time_left 80 "pixelcnn++ profile"; then
  echo "pixel: $(pixel_row "${cifar[@]}" --set train.batch_size=16 --sync --profile "$out/pp-pixel.json")"
  echo "twin:  $(row "${twin_pp[@]}" --batch 16 --dropout 0.5 --sync --profile "$out/pp-twin.json")"
  summarise "$out/pp-pixel.json" "$out/pp-twin.json" --top 25
fi

section "done"
