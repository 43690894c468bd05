#!/usr/bin/env bash
# nnU-Net 3d_fullres on the Decathlon's hippocampus (issue 27), without DP and with DP at
# epsilon 8 (delta 1e-5, unit: case), on the 160 training cases of
# docs/results/hippocampus/split.json (fold "all"), scored on its 40 test cases.
#   NNHIPPO=/work/nnhippo bash docs/results/nnunet_hippocampus/run.sh [STAGE ...]
# Stages: data (import the split, plan and preprocess, the CPU plans), nodp, dp, predict.
# Each training run: one thread, nnU-Net's augmentation in the main process.
set -euo pipefail
cd "${ROOT:-$(dirname "$0")/../../..}"
N=${NNHIPPO:-runs/nnunet_hippocampus}
export nnUNet_raw=$N/raw nnUNet_preprocessed=$N/pre nnUNet_results=$N/res nnUNet_n_proc_DA=0
D=${D:-.venv/bin/dpseg}
HERE=docs/results/nnunet_hippocampus
SCHEDULE_NODP="--epochs 10 --iterations-per-epoch 50 --val-iterations 1"
SCHEDULE_DP="--epochs 6 --iterations-per-epoch 25"
DP="--sample-rate 0.1 --expected-cases 16 --patches-per-case 2 --max-grad-norm 1 --target-epsilon 8 --delta 1e-5"
stages=("$@"); [ ${#stages[@]} -gt 0 ] || stages=(data nodp dp predict)
mkdir -p "$N/logs"
for stage in "${stages[@]}"; do
  echo "$(date +%T) $stage"
  case $stage in
    data)
      $D nnunet import-msd --data ../shared/data/hippocampus --id 4 --split docs/results/hippocampus/split.json
      .venv/bin/nnUNetv2_plan_and_preprocess -d 4 -c 3d_fullres -np 1 -npfp 1 --verify_dataset_integrity
      .venv/bin/python $HERE/make_plans.py ;;
    nodp)
      # shellcheck disable=SC2086
      ( time nice -n 10 $D nnunet train 4 3d_fullres all -p nnUNetPlans_cpu --no-dp $SCHEDULE_NODP \
          --threads 1 --device cpu --no-final-validation ) > "$N/logs/nodp.log" 2>&1 ;;
    dp)
      # shellcheck disable=SC2086
      ( time nice -n 10 $D nnunet train 4 3d_fullres all -p nnUNetPlans_cpu $DP $SCHEDULE_DP \
          --threads 1 --device cpu ) > "$N/logs/dp.log" 2>&1 ;;
    predict)
      for tr in nnUNetTrainer nnUNetTrainerDP; do
        ( time OMP_NUM_THREADS=1 nice -n 10 $D nnunet predict -i "$nnUNet_raw/Dataset004_Hippocampus/imagesTs" \
            -o "$N/pred/$tr" -d 4 -c 3d_fullres -f all -p nnUNetPlans_cpu -tr $tr -device cpu \
            -npp 1 -nps 1 ) > "$N/logs/predict_$tr.log" 2>&1
      done ;;
  esac
done
