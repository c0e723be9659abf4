#!/usr/bin/env bash
# Development-machine driver of the DR-MGF ablations (benchmarks/train_methods.py with option entries):
# runs from the worktree at /work/bench like convergence_worker.sh, resumes finished and interrupted runs
# from /work/bench-runs/ablations, and commits the table into /work/main when all seeds are done.
#   setsid nohup benchmarks/ablations_worker.sh > /work/bench-ablations.log 2>&1 < /dev/null &
cd /work/bench
export PYTHONPATH=/work/bench OMP_NUM_THREADS=1
PY=/work/main/.venv/bin/python
METHODS="joint,drmgf,meta-gf,dr-avgf,drmgf[momentum=fused],drmgf[momentum=reset],drmgf[switch_epoch=1],drmgf[passes=split]"
$PY benchmarks/train_methods.py --methods "$METHODS" --no-equal-compute --threads 1 \
  --runs-dir /work/bench-runs/ablations --results benchmarks/results/train_ablations.md || exit 1
cp benchmarks/results/train_ablations.md benchmarks/results/train_ablations.json /work/main/benchmarks/results/
for i in 1 2 3 4 5 6; do
  (cd /work/main && git commit -q -m "DR-MGF ablations (fixed method, 3 seeds, 4 epochs): table regenerated" \
    -- benchmarks/results/train_ablations.md benchmarks/results/train_ablations.json) && break
  sleep 20
done
