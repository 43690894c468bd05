#!/usr/bin/env bash
# SegResNet (init 16, 48^3, batch 2) in fresh processes, three per policy for freed memory,
# alternating (keep: the commands' default; return: glibc's), then the page faults under
# each. POLICIES="keep" reruns one policy alone.
#   bash docs/results/floor26/malloc10/across_processes.sh  (about 15 minutes, idle cores)
set -euo pipefail
cd "$(dirname "$0")/../../../.."
D=docs/results/floor26/malloc10
P=${POLICIES:-keep return}
B=".venv/bin/dpseg bench --engines none,dpseg --repeats 15 --round-seconds 1 --size 48 --batch 2"
M='--model monai.networks.nets:SegResNet'
K='{"spatial_dims": 3, "in_channels": 1, "out_channels": 2, "init_filters": 16}'
for i in 1 2 3; do
  for p in $P; do
    $B $M --model-kwargs "$K" --freed-memory "$p" --out $D/segresnet_$p$i
  done
done
for i in 1 2; do
  for p in $P; do
    .venv/bin/python $D/faults_by_policy.py "$p" 12 > $D/faults_$p$i.txt
  done
done
