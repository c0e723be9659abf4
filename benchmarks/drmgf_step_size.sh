#!/usr/bin/env bash
# DR-MGF's exit-pass loss weighs the exits 1 + 0.4*(T-1) = 2.2 against joint's T = 4: test whether the
# effective step size explains DR-MGF's lag after the lr drops (6 epochs, 4,000 images, seed 0).
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=1
PY=${PYTHON:-python}
D=npz:../shared/data/fashion-mnist.npz
RUNS=${RUNS:-runs/drmgf-step-size}
for spec in "joint 0.1" "drmgf 0.1" "drmgf 0.18"; do
  set -- $spec
  RUN=$RUNS/$1-lr$2
  [ -f $RUN/summary.json ] && continue
  if [ -f $RUN/checkpoints/last.pt ]; then $PY -m anytime.cli train --resume $RUN --device cpu -q
  else $PY -m anytime.cli train --arch msdnet-tiny --data $D --method $1 --lr $2 --epochs 6 --seed 0 --train-limit 4000 --device cpu -o $RUN -q; fi
done
