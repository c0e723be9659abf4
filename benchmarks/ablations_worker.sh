#!/usr/bin/env bash
# Development-machine driver of the DR-MGF ablations (benchmarks/train_methods.py with option entries):
# runs from the worktree at /work/bench like convergence_worker.sh, one (method, seed) run at a time, and
# commits each finished run's row into /work/main (benchmarks/results/train_ablations_runs/), so that a
# later session, whose /work/bench-runs is gone, trains only what is missing; the table is written and
# committed when every run is done.
#   setsid nohup benchmarks/ablations_worker.sh > /work/bench-ablations.log 2>&1 < /dev/null &
cd /work/bench
export PYTHONPATH=/work/bench OMP_NUM_THREADS=1
PY=/work/main/.venv/bin/python
KEEP=/work/main/benchmarks/results/train_ablations_runs
RUNS=/work/bench-runs/ablations
METHODS=("joint" "drmgf" "meta-gf" "dr-avgf" "drmgf[momentum=fused]" "drmgf[momentum=reset]" "drmgf[switch_epoch=1]" "drmgf[passes=split]")
commit() {
  for i in 1 2 3 4 5 6; do
    (cd /work/main && git add -- "$@" && git commit -q -m "$MESSAGE" -- "$@") && return 0
    sleep 20
  done
}
for seed in 0 1 2; do
  for method in "${METHODS[@]}"; do
    $PY benchmarks/train_methods.py --methods "$method" --seeds "$seed" --no-equal-compute --threads 1 \
      --runs-dir "$RUNS" --keep-rows "$KEEP" --results /tmp/ablation-one.md > /tmp/ablation-one.log 2>&1 \
      || { cat /tmp/ablation-one.log; exit 1; }
    grep -E "test avg" /tmp/ablation-one.log
    if [ -n "$(cd /work/main && git status --porcelain -- benchmarks/results/train_ablations_runs)" ]; then
      MESSAGE="DR-MGF ablations: $method seed $seed finished (row kept for later sessions)"
      commit benchmarks/results/train_ablations_runs
    fi
  done
done
all=$(IFS=,; echo "${METHODS[*]}")
$PY benchmarks/train_methods.py --methods "$all" --no-equal-compute --threads 1 \
  --runs-dir "$RUNS" --keep-rows "$KEEP" --results benchmarks/results/train_ablations.md || exit 1
cp benchmarks/results/train_ablations.md benchmarks/results/train_ablations.json /work/main/benchmarks/results/
MESSAGE="DR-MGF ablations (fixed method, 3 seeds, 4 epochs): table regenerated"
commit benchmarks/results/train_ablations.md benchmarks/results/train_ablations.json
echo "ablations finished"
