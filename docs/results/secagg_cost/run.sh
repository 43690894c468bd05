#!/usr/bin/env bash
# The cost of SecAgg+ per round beside the plain round for the same three sites, on loopback
# (real Flower processes) and in process (the protocol alone). Writes the runs to OUT
# (default runs/secagg_cost), prints the table of README.md, and copies results.json here:
#   bash docs/results/secagg_cost/run.sh
set -euo pipefail
OUT=${1:-runs/secagg_cost}
rm -rf "$OUT"
.venv/bin/python docs/results/secagg_cost/measure.py "$OUT"
cp "$OUT/results.json" docs/results/secagg_cost/results.json
