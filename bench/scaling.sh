#!/usr/bin/env bash
# Data-parallel scaling on one machine, measured back to back: the README's gated 5x5 model at a
# global batch of 64, one process with 2 threads against 2 MPI ranks with 1 thread each (each rank
# bound to its own core by mpirun), on each CPU backend. Run from the repository root:
#
#   bash bench/scaling.sh [PIXEL] [ROUNDS]
#
# PIXEL: a `pixel` built with --features tch,mpi (default: target/release/pixel).
# ROUNDS: how many times each pair runs, alternating (default 2); each line is one measurement.
# Prints images per second, the share of a step spent in the all-reduce of the gradients, the
# share spent waiting for the slower rank (a barrier before the all-reduce, timed apart) and each
# rank's peak memory.
set -euo pipefail
pixel=${1:-target/release/pixel}
rounds=${2:-2}
steps=${STEPS:-15}
exp=experiments/quickstart.toml
model=(--set model.variant=gated --set train.batch_size=64 --steps "$steps" --no-grid)
mpi=(mpirun --oversubscribe -n 2)
[ "$(id -u)" = 0 ] && mpi+=(--allow-run-as-root)

summary() {
  python3 -c '
import json, sys
for line in sys.stdin:
    if line.startswith("{"):
        r = json.loads(line)
        per = r.get("peak_rss_mib_per_rank") or [r["peak_rss_mib"]]
        reduce = r["collective_share"] - r["waiting_share"]
        print("%-12s %d rank(s) %6.3f s/step %6.1f images/s  all-reduce %5.2f %% (%.1f ms)  waiting %4.1f %%  peak MiB %s"
              % (r["device"], r["ranks"], r["seconds_per_step"], r["train_images_per_second"],
                 100 * reduce, 1000 * reduce * r["seconds_per_step"], 100 * r["waiting_share"],
                 " ".join("%.0f" % m for m in per)))
'
}

for r in $(seq "$rounds"); do
  echo "--- round $r ($(date -u +%H:%M:%S))"
  for backend in libtorch flex; do
    set_backend=(--set runtime.backend="$backend" --set runtime.device=cpu)
    OMP_NUM_THREADS=2 RAYON_NUM_THREADS=2 "$pixel" bench "$exp" "${model[@]}" "${set_backend[@]}" \
      2>/dev/null | summary
    "${mpi[@]}" -x OMP_NUM_THREADS=1 -x RAYON_NUM_THREADS=1 "$pixel" bench "$exp" "${model[@]}" \
      "${set_backend[@]}" 2>/dev/null | summary
  done
done
