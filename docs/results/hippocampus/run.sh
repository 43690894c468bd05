#!/usr/bin/env bash
# The runs behind docs/results/hippocampus (issue 24), one at a time, one thread each, niced:
#   bash docs/results/hippocampus/run.sh tune          # every tuning configuration below
#   bash docs/results/hippocampus/run.sh final         # the chosen ones on all 160, scored on the 40 test cases
#   bash docs/results/hippocampus/run.sh pretrain      # the phantom pretraining the dpp_* runs start from
#   bash docs/results/hippocampus/run.sh NAME [NAME..] # some configurations, by name
#   .venv/bin/python docs/results/hippocampus/summarize.py   # tuning.md, test.md, copies the finals here
# Each run writes $R/[tune/]NAME/ (report, checkpoint), NAME.cmd (its command) and NAME.log.
# A run whose folder holds a report.json is skipped, so the script can be rerun after a stop.
#
# Add a configuration: one "NAME|TRAIN OPTIONS" line in TUNE (model selection: validation is
# drawn from inside the 160 training cases, the 40 test cases are never loaded) or one
# "NAME|TRAIN OPTIONS|EVALUATE OPTIONS" line in FINAL (trained on all 160 with
# --val-fraction 0, then `dpseg evaluate` on the 40 test cases; e.g. EVALUATE OPTIONS
# "--also non-private=$R/nodp_s0/checkpoint.pt" puts that model's predictions beside this
# one's in the overlay panels). A DP line is the same with --target-epsilon 8 (and, once the
# engine has it, its patches-per-case option) in place of --no-dp.
set -euo pipefail
cd "${ROOT:-$(dirname "$0")/../../..}"  # ROOT: the repository, when run from a copy
D=${D:-.venv/bin/dpseg}
DATA=${DATA:-../shared/data/hippocampus}
SPLIT=docs/results/hippocampus/split.json
R=${R:-runs/hippocampus}
COMMON="--data $DATA --split $SPLIT --threads 1 --quiet"
BASE="--patch 24 --channels 8,16,32 --batch 16 --lr 3e-3 --lr-schedule cosine"

TUNE=(
  # the issue's configuration, with main's CT window on MR (before --normalize existed) and with
  # each volume's percentiles (auto for MRI)
  "t01_window|--no-dp $BASE --steps 300 --normalize window"
  "t02_pct|--no-dp $BASE --steps 300"
  "t03_1000|--no-dp $BASE --steps 1000 --eval-every 250"
  "t04_p32b8|--no-dp --patch 32 --channels 8,16,32 --batch 8 --lr 3e-3 --lr-schedule cosine --steps 1000 --eval-every 250"
  # learning rate, at the 300 steps of t02
  "t05_lr1e-2|--no-dp --patch 24 --channels 8,16,32 --batch 16 --lr 1e-2 --lr-schedule cosine --steps 300"
  "t06_lr1e-3|--no-dp --patch 24 --channels 8,16,32 --batch 16 --lr 1e-3 --lr-schedule cosine --steps 300"
  # depth: a fourth level (4^3 at the bottom of a 32^3 patch)
  "t07_l4|--no-dp --patch 32 --channels 8,16,32,64 --batch 8 --lr 3e-3 --lr-schedule cosine --steps 1000 --eval-every 250"
  # width: 12,24,48 (191 k parameters, ~2x the compute of 8,16,32)
  "t08_c12|--no-dp --patch 32 --channels 12,24,48 --batch 8 --lr 3e-3 --lr-schedule cosine --steps 1000 --eval-every 250"
  # learning rate at t04's configuration (1e-2 beat 3e-3 at 300 steps of patch 24, batch 16)
  "t09_lr6e-3|--no-dp --patch 32 --channels 8,16,32 --batch 8 --lr 6e-3 --lr-schedule cosine --steps 1000 --eval-every 250"
)
NP="--patch 32 --channels 8,16,32 --batch 8 --lr 3e-3 --lr-schedule cosine --steps 1000 --val-fraction 0"
# DP: chosen before any DP run on these cases, from the non-private configuration and DP's
# levers (not tuned on them): q = 0.2 over the 160 cases (normaliser 32), 2 patches of 24^3 a
# sampled case averaged before clipping, 300 steps, clip 1, sigma solved for epsilon 8.
DP="--patch 24 --channels 8,16,32 --sample-rate 0.2 --batch 32 --items-per-patient 2 --max-grad-norm 1 --lr 3e-3 --lr-schedule cosine --steps 300 --target-epsilon 8 --val-fraction 0 --privacy-unit case"
# DP's width lever (added after the runs above, fixed before it ran, one configuration): the
# same run at half the widths, 4,8,16 (about a quarter of the parameters, so half the noise
# norm at the same sigma, while the clipped signal keeps its norm of at most C).
DPN="${DP/--channels 8,16,32/--channels 4,8,16}"
# Public pretraining (the lever the issue names, tried after the runs above and fixed before
# any DP run from it): the same U-Net trained without DP on 40 of dpseg's synthetic CT
# phantoms (dpseg phantoms: no patient, disjoint from Task04; liver masks, so the output
# layer for Task04's three classes starts fresh), then the DP run above from those weights.
PHANTOMS=$R/phantoms
PRE="--data $PHANTOMS --threads 1 --quiet --no-dp --patch 24 --channels 8,16,32 --batch 16 --lr 3e-3 --lr-schedule cosine --steps 600 --val-fraction 0.1 --seed 0"
DPP="$DP --init $R/pre_phantoms/checkpoint.pt"
FINAL=(
  "nodp_s0|--no-dp $NP --seed 0|"
  "dp_s0|$DP --seed 0|--also non-private=$R/nodp_s0/checkpoint.pt"
  "nodp_s1|--no-dp $NP --seed 1|"
  "dp_s1|$DP --seed 1|--also non-private=$R/nodp_s1/checkpoint.pt"
  "dpn_s0|$DPN --seed 0|--also non-private=$R/nodp_s0/checkpoint.pt --also dp=$R/dp_s0/checkpoint.pt"
  "dpn_s1|$DPN --seed 1|--also non-private=$R/nodp_s1/checkpoint.pt --also dp=$R/dp_s1/checkpoint.pt"
  "dpp_s0|$DPP --seed 0|--also non-private=$R/nodp_s0/checkpoint.pt --also dp=$R/dp_s0/checkpoint.pt"
  "dpp_s1|$DPP --seed 1|--also non-private=$R/nodp_s1/checkpoint.pt --also dp=$R/dp_s1/checkpoint.pt"
  # a third seed of the pretraining lever (added later, the same configuration): its two
  # seeds' results were 0.28 apart
  "dpp_s2|$DPP --seed 2|--also non-private=$R/nodp_s0/checkpoint.pt"
  # its pair from scratch (the same added later): DP from scratch at seed 2
  "dp_s2|$DP --seed 2|--also non-private=$R/nodp_s0/checkpoint.pt"
)

pretrain() {  # the phantoms, then the non-private model the dpp_* runs start from
  mkdir -p "$R"
  [ -f "$PHANTOMS/dataset.json" ] ||
    $D phantoms --out "$PHANTOMS" --cases 40 --sites 1 --size 48 --seed 7 --quiet
  if [ -f "$R/pre_phantoms/report.json" ]; then echo "skip pre_phantoms (done)"; return; fi
  echo "dpseg train $PRE --out $R/pre_phantoms" > "$R/pre_phantoms.cmd"
  echo "$(date +%T) pre_phantoms"
  # shellcheck disable=SC2086
  ( time nice -n 10 $D train $PRE --out "$R/pre_phantoms" ) > "$R/pre_phantoms.log" 2>&1
  grep -m 1 "validation Dice" "$R/pre_phantoms.log" || tail -n 5 "$R/pre_phantoms.log"
}

run_one() {  # run_one DIR NAME OPTIONS
  local dir=$1 name=$2 opts=$3
  mkdir -p "$dir"
  if [ -f "$dir/$name/report.json" ]; then echo "skip $name (done)"; return; fi
  echo "dpseg train $COMMON $opts --out $dir/$name" > "$dir/$name.cmd"
  echo "$(date +%T) $name"
  # shellcheck disable=SC2086
  ( time nice -n 10 $D train $COMMON $opts --out "$dir/$name" ) > "$dir/$name.log" 2>&1
  grep -m 1 "validation Dice" "$dir/$name.log" || tail -n 5 "$dir/$name.log"
}

score() {  # score NAME [EVALUATE OPTIONS]: the 40 test cases
  local name=$1 extra=${2:-}
  # shellcheck disable=SC2086
  nice -n 10 $D evaluate --checkpoint "$R/$name/checkpoint.pt" --data "$DATA" \
    --cases "$SPLIT:test" --out "$R/$name/test.json" --threads 1 --quiet $extra \
    > "$R/$name.test.log" 2>&1
  head -n 5 "$R/$name.test.log"
}

final_one() {  # final_one "NAME|TRAIN OPTIONS[|EVALUATE OPTIONS]"
  local name opts extra
  IFS='|' read -r name opts extra <<< "$1"
  run_one "$R" "$name" "$opts"
  [ -f "$R/$name/test.json" ] || score "$name" "$extra"
}

lookup() {  # lookup NAME ARRAY...: the options of NAME
  local want=$1; shift
  for line in "$@"; do [ "${line%%|*}" = "$want" ] && { echo "${line#*|}"; return 0; }; done
  return 1
}

targets=("$@")
[ ${#targets[@]} -eq 0 ] && targets=(tune final)
for t in "${targets[@]}"; do
  case $t in
    tune) for line in "${TUNE[@]}"; do run_one "$R/tune" "${line%%|*}" "${line#*|}"; done ;;
    final) pretrain; for line in "${FINAL[@]}"; do final_one "$line"; done ;;
    pretrain) pretrain ;;
    *)
      if opts=$(lookup "$t" "${TUNE[@]}"); then run_one "$R/tune" "$t" "$opts"
      elif opts=$(lookup "$t" "${FINAL[@]}"); then final_one "$t|$opts"
      else echo "no configuration named $t in run.sh" >&2; exit 2; fi ;;
  esac
done
