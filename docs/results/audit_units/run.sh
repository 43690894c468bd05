#!/usr/bin/env bash
# The audits of issues 22 and 23: the patient as the unit, and the add/remove worlds.
# Run from the repository root: bash docs/results/audit_units/run.sh (about an hour on 2 cores).
set -euo pipefail
out=docs/results/audit_units
dpseg=.venv/bin/dpseg
py=.venv/bin/python

# A canary patient of 4 rows, through MONAI's list_data_collate and through a declared
# patient map: clipped as one unit, it moves its slot by C once, so the bound stays under
# the accountant's claim for one unit.
$dpseg audit --noise-multiplier 1 --rows-per-canary 4 --canary-layout multi-sample \
  --collate monai --trials 200000 --out $out/patient_multi_sample
$dpseg audit --noise-multiplier 1 --rows-per-canary 4 --canary-layout patients \
  --trials 200000 --out $out/patient_declared

# Add/remove worlds (N = 100 against 101 patients, batch 10, one pass), sigma 1: the
# declared constants, and Opacus's convention (whose claim is replace-one).
$dpseg audit --worlds add-remove --noise-multiplier 1 --runs 1000 --out $out/worlds_declared
$dpseg audit --worlds add-remove --noise-multiplier 1 --runs 500 --opacus-convention \
  --out $out/worlds_opacus_convention

# The sabotages (test-only changes, applied by this script in its own process): rows
# clipped apart, and the old N-derived q, steps and divisor under an add/remove claim.
$py $out/sabotage.py $out/sabotage.json
