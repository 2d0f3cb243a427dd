#!/usr/bin/env bash
# The Slurm tier: sweeps emitted by `pixel sweep --emit slurm` run unmodified on a real single-node
# Slurm (Debian's slurm-wlm and munge, brought up by .ci/slurm-up.sh), submitted from another folder:
#   1. the smoke sweep (4 runs) on 1 rank and on 2 ranks per run: every run completes, and the two
#      give the same test bits/dim;
#   2. a run that is sent the time limit's signal (SIGTERM to the batch shell, as --signal=B:TERM@120
#      does) after its first epoch, on 1 rank and on 2: it checkpoints, exits 130, the task requeues
#      itself, resumes and completes, with one metrics row per epoch, the same numbers as the
#      uninterrupted 1-rank run of the smoke sweep's kind, and run.json "completed".
#
#   bash .ci/slurm-check.sh PIXEL WORK_DIR     (PIXEL built with --features mpi)
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
pixel=$(realpath "$1")
work=$(realpath -m "$2")
mkdir -p "$work"
bash "$repo/.ci/slurm-up.sh"

# Waits (at most $2 seconds) until `squeue` no longer lists job $1.
wait_done() {
  local i
  for i in $(seq "$2"); do
    squeue -h -j "$1" 2> /dev/null | grep -q . || return 0
    sleep 1
  done
  echo "job $1 still queued after $2 s:"; squeue; tail -30 /var/log/slurm/slurmctld.log; return 1
}
# Succeeds when every run folder under $1 says "completed".
all_completed() {
  local n=0 f
  for f in "$1"/*/run.json; do
    grep -q '"status": "completed"' "$f" || { echo "$f:"; cat "$f"; tail -20 "$1"/slurm-*.out; return 1; }
    n=$((n + 1))
  done
  [ "$n" = "$2" ] || { echo "expected $2 runs in $1, found $n"; return 1; }
}

echo "--- the smoke sweep as emitted, 1 rank and 2 ranks per run"
for ranks in 1 2; do
  "$pixel" sweep "$repo/experiments/smoke/sweeps/synthetic-depth.toml" --emit slurm --ranks "$ranks" \
    --results "$work/smoke $ranks" > /dev/null
  jid=$(cd / && sbatch --parsable "$work/smoke $ranks/synthetic-depth/slurm.sh")
  wait_done "$jid" 300
  all_completed "$work/smoke $ranks/synthetic-depth" 4
done
python3 - "$work/smoke 1/synthetic-depth" "$work/smoke 2/synthetic-depth" <<'PY'
import csv, os, sys
one, two = sys.argv[1:]
for run in sorted(os.listdir(one)):
    if not os.path.isdir(os.path.join(one, run)):
        continue
    last = lambda d: float(list(csv.DictReader(open(os.path.join(d, run, "metrics.csv"))))[-1]["test_bits_per_dim"])
    a, b = last(one), last(two)
    assert abs(a - b) < 1e-5, f"{run}: 1 rank {a}, 2 ranks {b}"
    print(f"{run}: test bits/dim {a:.6f} on 1 rank, {b:.6f} on 2")
PY

echo "--- the time limit's signal after the first epoch: checkpoint, requeue, resume, 1 and 2 ranks"
cat > "$work/slow.toml" <<'TOML'
description = "a run of three epochs of some seconds each, for the requeue check"
[model]
variant = "simple"
layers = 2
kernel = 3
channels = 6
[data]
dataset = "synthetic"
synthetic_images = 20000
[train]
epochs = 3
batch_size = 32
[sample]
grid = 2
TOML
for ranks in 1 2; do
  cat > "$work/requeue$ranks.toml" <<TOML
description = "requeue check on $ranks ranks"
base = "slow.toml"
[grid]
"train.seed" = [1]
[slurm]
ranks = $ranks
[slurm.sbatch]
time = "00:20:00"
TOML
  "$pixel" sweep "$work/requeue$ranks.toml" --emit slurm --results "$work/requeue" > /dev/null
  run="$work/requeue/requeue$ranks/seed=1"
  jid=$(cd / && sbatch --parsable "$work/requeue/requeue$ranks/slurm.sh")
  for _ in $(seq 300); do
    [ -f "$run/metrics.csv" ] && [ "$(wc -l < "$run/metrics.csv")" -ge 2 ] && break
    sleep 0.5
  done
  [ "$(wc -l < "$run/metrics.csv")" -ge 2 ] || { echo "the first epoch did not end"; exit 1; }
  # What Slurm does two minutes before the time limit (--signal=B:TERM@120).
  scancel --signal=TERM --batch "${jid}_0"
  for _ in $(seq 120); do
    squeue -h -j "$jid" -t PENDING 2> /dev/null | grep -q . && break
    sleep 0.5
  done
  grep -q '"status": "interrupted"' "$run/run.json" ||
    { echo "not interrupted:"; cat "$run/run.json"; cat "$work/requeue/requeue$ranks"/slurm-*.out; exit 1; }
  # A requeued task waits for its begin time (about two minutes); start it now, but only once
  # the node has finished with its first run and a new second has begun: slurmd revokes the
  # task's credential when it is killed, with a resolution of one second, and refuses a launch
  # whose credential is not newer ("Job credential revoked"; the task then fails for good).
  for _ in $(seq 120); do
    [ "$(sinfo -h -o %T | sort -u)" = idle ] && break
    sleep 0.5
  done
  sleep 2
  scontrol update JobId="${jid}_0" StartTime=now
  wait_done "$jid" 300
  all_completed "$work/requeue/requeue$ranks" 1
  [ "$(wc -l < "$run/metrics.csv")" = 4 ] || { echo "expected 3 epochs:"; cat "$run/metrics.csv"; exit 1; }
  grep -q '"resumed": \[$' "$run/run.json" || { echo "not resumed:"; cat "$run/run.json"; exit 1; }
  grep -c "checkpoint written" "$work/requeue/requeue$ranks"/slurm-*.out
done
python3 - "$work/requeue/requeue1/seed=1" "$work/requeue/requeue2/seed=1" <<'PY'
import csv, os, sys
rows = [list(csv.DictReader(open(os.path.join(d, "metrics.csv")))) for d in sys.argv[1:]]
for a, b in zip(*rows):
    assert abs(float(a["test_bits_per_dim"]) - float(b["test_bits_per_dim"])) < 1e-5, (a, b)
print("requeued runs on 1 and 2 ranks agree:", [r["test_bits_per_dim"][:8] for r in rows[0]])
PY
echo "slurm: every emitted task completed, and both requeues resumed"
