#!/usr/bin/env bash
# How the DP gap moves with the number of cases (issue 24, item 6): the final configurations
# of run.sh on the nested subsets of split.json (train40_sS of train80_sS of the 160, for
# seeds S = 0 and 1; the 160-case runs are run.sh's dp_sS and nodp_sS),
# scored on the same 40 test cases. One thread each, niced, one at a time:
#   bash docs/results/hippocampus/trend.sh [NAME ...]
# At every size DP keeps q = 0.2, 300 steps and so the same sigma for epsilon 8; the
# normaliser is q N (8 at 40 cases, 16 at 80, 32 at 160), so the noise in the mean gradient
# grows as 1/N: that is the trend measured.
# Retuned per size (the dp40r_ and dp80r_ runs): the expected batch kept at the 160-case
# run's 32 cases (q = 0.8 at 40, 0.4 at 80), 300 steps, sigma solved again for epsilon 8
# (8.35 at q 0.8, 4.25 at q 0.4): noise std in the mean gradient 0.26 and 0.133 against
# 0.28 and 0.14 at q 0.2 (sigma / (q N), PRV), at 4x and 2x the compute a step. A rule
# fixed before any run, from public quantities alone; one configuration a size.
set -euo pipefail
cd "${ROOT:-$(dirname "$0")/../../..}"
D=${D:-.venv/bin/dpseg}
DATA=${DATA:-../shared/data/hippocampus}
SPLIT=docs/results/hippocampus/split.json
R=${R:-runs/hippocampus}
NP="--no-dp --patch 32 --channels 8,16,32 --batch 8 --lr 3e-3 --lr-schedule cosine --steps 1000 --val-fraction 0"
DP="--patch 24 --channels 8,16,32 --sample-rate 0.2 --items-per-patient 2 --max-grad-norm 1 --lr 3e-3 --lr-schedule cosine --steps 300 --target-epsilon 8 --val-fraction 0 --privacy-unit case"
RUNS=(
  "dp40_s0|$DP --batch 8 --split $SPLIT:train40_s0 --seed 0"
  "dp80_s0|$DP --batch 16 --split $SPLIT:train80_s0 --seed 0"
  "nodp40_s0|$NP --split $SPLIT:train40_s0 --seed 0"
  "nodp80_s0|$NP --split $SPLIT:train80_s0 --seed 0"
  "dp40_s1|$DP --batch 8 --split $SPLIT:train40_s1 --seed 1"
  "dp80_s1|$DP --batch 16 --split $SPLIT:train80_s1 --seed 1"
  "nodp40_s1|$NP --split $SPLIT:train40_s1 --seed 1"
  "nodp80_s1|$NP --split $SPLIT:train80_s1 --seed 1"
  "dp40r_s0|$DP --sample-rate 0.8 --batch 32 --split $SPLIT:train40_s0 --seed 0"
  "dp80r_s0|$DP --sample-rate 0.4 --batch 32 --split $SPLIT:train80_s0 --seed 0"
  "dp40r_s1|$DP --sample-rate 0.8 --batch 32 --split $SPLIT:train40_s1 --seed 1"
  "dp80r_s1|$DP --sample-rate 0.4 --batch 32 --split $SPLIT:train80_s1 --seed 1"
)
want=("$@")
for line in "${RUNS[@]}"; do
  name=${line%%|*} opts=${line#*|}
  if [ ${#want[@]} -gt 0 ] && [[ ! " ${want[*]} " == *" $name "* ]]; then continue; fi
  if [ ! -f "$R/$name/report.json" ]; then
    echo "dpseg train --data $DATA --threads 1 --quiet $opts --out $R/$name" > "$R/$name.cmd"
    echo "$(date +%T) $name"
    # shellcheck disable=SC2086
    ( time nice -n 10 $D train --data "$DATA" --threads 1 --quiet $opts --out "$R/$name" ) > "$R/$name.log" 2>&1
  fi
  if [ ! -f "$R/$name/test.json" ]; then
    nice -n 10 $D evaluate --checkpoint "$R/$name/checkpoint.pt" --data "$DATA" \
      --cases "$SPLIT:test" --out "$R/$name/test.json" --threads 1 --quiet > "$R/$name.test.log" 2>&1
    head -n 5 "$R/$name.test.log"
  fi
done
