#!/usr/bin/env bash
# The CPU figures the docs quote (README's results table, benchmarks.md's CPU section and
# docs/experiments.md's ensembles), measured again and kept as records: the benchmark table, the
# quick preset's whole command, and the ensemble of the recipe experiment's cpu runs. Run it on
# a machine with nothing else running (about 10 minutes on 2 cores), then commit OUT.
#
#   DATA=../shared/data/fashion_mnist OUT=docs/cpu_runs/$(date +%F) bash scripts/cpu_records.sh
#
# DATA: the folder of the four Fashion-MNIST files (or any --data_dir train.py takes).
# RUNS: scripts/experiment.py's --runs_dir, whose recipe/cpu/improved-seed{0,1,2} make the
# ensemble (`python scripts/experiment.py recipe --preset cpu --seeds 3` trains them); skipped
# when they are missing. PARTS: which of "bench quick ensemble" to run (default all).
set -euo pipefail
cd "$(dirname "$0")/.."
DATA=${DATA:?set DATA to the Fashion-MNIST folder}
OUT=${OUT:?set OUT to the folder for the records}
RUNS=${RUNS:-runs/experiments}
PARTS=${PARTS:-bench quick ensemble}
PYTHON=${PYTHON:-python3}
mkdir -p "$OUT"
part() { [[ " $PARTS " == *" $1 "* ]]; }
# A command's wall time, in seconds, appended to its log.
timed() {
  local log=$1; shift
  local start=$(date +%s.%N)
  "$@" > "$log" 2>&1
  "$PYTHON" -c "print('wall_s', round($(date +%s.%N) - $start, 1))" | tee -a "$log"
  sed -i "s|$PWD/||g" "$log"  # (train.py prints the absolute workdir: keep no machine's paths)
}

{ date -u +%FT%TZ; git rev-parse --short HEAD; nproc; "$PYTHON" -c "import jax; print('jax', jax.__version__)"; } \
  > "$OUT/machine.txt"

if part bench; then  # benchmarks.md, "This machine's CPU": its three rows
  # (--json: the JSON lines on stdout, the readable table on stderr, kept in bench.txt)
  "$PYTHON" scripts/benchmark.py --json > "$OUT/bench_default.jsonl" 2>> "$OUT/bench.txt"
  "$PYTHON" scripts/benchmark.py --image_size 28 --batch_size 128 --width 32 --json \
    > "$OUT/bench_quick_size.jsonl" 2>> "$OUT/bench.txt"
  "$PYTHON" scripts/benchmark.py --image_size 96 --batch_size 128 --steps 2 --json \
    > "$OUT/bench_chapter_size.jsonl" 2>> "$OUT/bench.txt"
fi

if part quick; then  # the README's CPU row: the quick preset, the whole command
  work=runs/cpu_records_quick  # relative, so that the records name no machine's paths
  rm -rf "$work"
  timed "$OUT/quick.log" "$PYTHON" scripts/train.py --preset=quick --data_dir="$DATA" \
    --workdir="$work"
  cp "$work/metrics.jsonl" "$OUT/quick_metrics.jsonl"
  cp "$work/config.json" "$OUT/quick_config.json"
fi

if part ensemble; then  # docs/experiments.md, "Towards 0.960": models alone, ensemble, flips
  members=("$RUNS"/recipe/cpu/improved-seed{0,1,2})
  if [ -d "${members[2]}/checkpoints" ]; then
    for flip in "" --flip; do
      timed "$OUT/ensemble${flip:+_flip}.txt" "$PYTHON" scripts/evaluate.py \
        --workdir "${members[@]}" --data_dir="$DATA" $flip
    done
  else
    echo "ensemble: no ${members[2]}/checkpoints; skipped" | tee "$OUT/ensemble_skipped.txt"
  fi
fi
echo "records in $OUT"
