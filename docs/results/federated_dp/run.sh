#!/usr/bin/env bash
# The runs behind docs/results/federated_dp, one after another on a 2-core CPU (each run's
# wall time goes to runs/NAME.time, its command to runs/NAME.cmd), then the summary:
#   bash docs/results/federated_dp/run.sh && .venv/bin/python docs/results/federated_dp/summarize.py runs
set -euo pipefail
D=.venv/bin/dpseg
R=runs
mkdir -p $R
COMMON="--sites 3 --size 48 --spatial-dims 2 --patch 48 --channels 8,16,32 --rounds 30 --local-steps 20 --batch 256 --lr 3e-3 --dp-lr 3e-2 --lr-schedule cosine --target-epsilon 8 --delta 1e-5 --test-fraction 0.025 --eval-overlap 0 --eval-every 5 --no-plots"
run() { name=$1; shift; echo "dpseg federate $*" > $R/$name.cmd; ( time $D federate "$@" > $R/$name.log 2>&1 ) 2> $R/$name.time; }
# DP federated against non-private federated, seed 0 (6000 phantoms, 2000 a site)
run s0 --phantoms 6000 $COMMON --compare dpseg,none --seed 0 --out $R/s0
# each site alone, DP at the same epsilon, scored on every site's held-out patients
for s in site0 site1 site2; do
  run alone_$s --data $R/s0/phantoms $COMMON --engine dpseg --train-sites $s --seed 0 --out $R/alone_$s
done
# client-level DP (the unit a site; server-side clipping and noise), 10 rounds
C10="${COMMON/--rounds 30/--rounds 10}"
run client --data $R/s0/phantoms $C10 --engine none --client-clip 1.0 --client-noise 2.05 --seed 0 --out $R/client
# the training-time penalty at this scale, Opacus beside dpseg and none in one run
P2="${COMMON/--rounds 30/--rounds 2}"
run penalty --data $R/s0/phantoms ${P2/--eval-every 5/--eval-every 2} --compare dpseg,opacus,none --seed 0 --out $R/penalty
# the second seed (its own phantoms)
run s1 --phantoms 6000 $COMMON --compare dpseg,none --seed 1 --out $R/s1
