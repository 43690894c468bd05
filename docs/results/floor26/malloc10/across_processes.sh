#!/usr/bin/env bash
# SegResNet (init 16, 48^3, batch 2) in six fresh processes, alternating the policy for freed
# memory (keep: dpseg bench's default; return: glibc's), then the page faults under each.
#   bash docs/results/floor26/malloc10/across_processes.sh  (about 15 minutes, idle cores)
set -euo pipefail
cd "$(dirname "$0")/../../../.."
D=docs/results/floor26/malloc10
B=".venv/bin/dpseg bench --engines none,dpseg --repeats 15 --round-seconds 1 --size 48 --batch 2"
M='--model monai.networks.nets:SegResNet'
K='{"spatial_dims": 3, "in_channels": 1, "out_channels": 2, "init_filters": 16}'
for i in 1 2 3; do
  $B $M --model-kwargs "$K" --out $D/segresnet_keep$i
  $B $M --model-kwargs "$K" --freed-memory return --out $D/segresnet_return$i
done
for i in 1 2; do
  for p in keep return; do
    .venv/bin/python $D/faults_by_policy.py $p 12 > $D/faults_${p}$i.txt
  done
done
