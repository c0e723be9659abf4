#!/usr/bin/env bash
# Development-machine driver of benchmarks/train_convergence.py across sessions: runs the queue from a
# separate worktree at /work/bench (so edits in /work/main cannot change code under a running benchmark)
# and commits every finished run's result into /work/main. One worker per call; start two for two cores:
#   git -C /work/main worktree add --detach /work/bench HEAD    # once (or: git -C /work/bench checkout --detach main)
#   setsid nohup benchmarks/convergence_worker.sh > /work/bench-worker1.log 2>&1 < /dev/null &
# Arguments are passed to the benchmark's run and plan (e.g. --methods drmgf-steps8-5x,joint-25x --archs msdnet-tiny).
# Runs live in /work/bench-runs (an interrupted run resumes from its epoch checkpoint; a run whose
# directory is gone starts again).
cd /work/bench
export PYTHONPATH=/work/bench OMP_NUM_THREADS=1
PY=/work/main/.venv/bin/python
while true; do
  before=$(ls benchmarks/results/train_convergence/*.json 2>/dev/null | wc -l)
  $PY benchmarks/train_convergence.py run --runs-dir /work/bench-runs --max-runs 1 "$@" || { echo "run failed"; sleep 30; }
  after=$(ls benchmarks/results/train_convergence/*.json 2>/dev/null | wc -l)
  if [ "$after" -gt "$before" ] || [ -f /work/bench/benchmarks/results/train_convergence.md ]; then
    mkdir -p /work/main/benchmarks/results/train_convergence
    cp benchmarks/results/train_convergence/*.json /work/main/benchmarks/results/train_convergence/
    cp benchmarks/results/train_convergence.md /work/main/benchmarks/results/ 2>/dev/null
    cp benchmarks/results/train_convergence.png /work/main/benchmarks/results/ 2>/dev/null
    for i in 1 2 3 4 5 6; do
      (cd /work/main && git add benchmarks/results/train_convergence benchmarks/results/train_convergence.md benchmarks/results/train_convergence.png 2>/dev/null \
        && git commit -q -m "Convergence benchmark: $(ls benchmarks/results/train_convergence/*.json | wc -l) finished runs (results, table, plot)" -- benchmarks/results/train_convergence benchmarks/results/train_convergence.md benchmarks/results/train_convergence.png) && break
      sleep 20
    done
  fi
  todo=$($PY benchmarks/train_convergence.py plan "$@" | grep -c '^todo')
  [ "$todo" -eq 0 ] && break
  [ "$after" -eq "$before" ] && sleep 60   # nothing claimable right now (another worker holds it)
done
echo "queue finished"
