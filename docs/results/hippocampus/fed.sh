#!/usr/bin/env bash
# The federated runs of issue 24, one at a time, one thread each, niced:
#   bash docs/results/hippocampus/fed.sh [NAME ...]   (default: all, in order)
# Three sites simulated from one hospital: the 160 training cases of split.json dealt at
# random (iid) to site0-2; each holds out 5% of its cases to watch training (never used to
# choose anything); every model is then scored on the 40 test cases with `dpseg evaluate`.
# DP: each site at epsilon 8 (delta 1e-5, the unit a case): q = 0.3 over its ~53 cases
# (normaliser 16), 2 patches of 24^3 a sampled case averaged before clipping, 15 rounds of
# 10 local steps (150 DP steps a site), clip 1, Adam lr 3e-3; chosen before any run, not tuned.
# Seeds 0 and 1: each deals the cases to the sites anew.
set -euo pipefail
cd "${ROOT:-$(dirname "$0")/../../..}"
D=${D:-.venv/bin/dpseg}
DATA=${DATA:-../shared/data/hippocampus}
SPLIT=docs/results/hippocampus/split.json
R=${R:-runs/hippocampus}
COMMON="--data $DATA --split $SPLIT --sites 3 --partition iid --test-fraction 0.05 --rounds 15 --local-steps 10 --eval-every 5 --patch 24 --channels 8,16,32 --sample-rate 0.3 --batch 16 --items-per-patient 2 --max-grad-norm 1 --lr 3e-3 --target-epsilon 8 --privacy-unit case"
RUNS=(
  "fed_s0|--compare dpseg,none --seed 0"
  "alone_site0|--compare dpseg --train-sites site0 --seed 0"
  "alone_site1|--compare dpseg --train-sites site1 --seed 0"
  "alone_site2|--compare dpseg --train-sites site2 --seed 0"
  # a second seed (added later, the same configuration): the seed also deals the cases to
  # the sites, so alone_s1_siteK is a different third of the 160 than alone_siteK
  "fed_s1|--compare dpseg,none --seed 1"
  "alone_s1_site0|--compare dpseg --train-sites site0 --seed 1"
  "alone_s1_site1|--compare dpseg --train-sites site1 --seed 1"
  "alone_s1_site2|--compare dpseg --train-sites site2 --seed 1"
)
score() {  # score RUN ENGINE
  nice -n 10 $D evaluate --checkpoint "$R/$1/checkpoint_$2.pt" --data "$DATA" \
    --cases "$SPLIT:test" --out "$R/$1/test_$2.json" --threads 1 --quiet > "$R/$1.test_$2.log" 2>&1
  head -n 3 "$R/$1.test_$2.log"
}
want=("$@")
for line in "${RUNS[@]}"; do
  name=${line%%|*} opts=${line#*|}
  if [ ${#want[@]} -gt 0 ] && [[ ! " ${want[*]} " == *" $name "* ]]; then continue; fi
  if [ ! -f "$R/$name/report.json" ]; then
    echo "dpseg federate $COMMON $opts --out $R/$name" > "$R/$name.cmd"
    echo "$(date +%T) $name"
    # shellcheck disable=SC2086
    ( time OMP_NUM_THREADS=1 nice -n 10 $D federate $COMMON $opts --out "$R/$name" ) > "$R/$name.log" 2>&1
  fi
  for e in dpseg none; do
    [ -f "$R/$name/checkpoint_$e.pt" ] && { [ -f "$R/$name/test_$e.json" ] || score "$name" "$e"; }
  done
done
