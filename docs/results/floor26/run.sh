#!/usr/bin/env bash
# Issue 26's table: MONAI's networks, non-private against dpseg's DP step, engines
# interleaved in one process, 15 rounds each after warm-up (median and interquartile range;
# a round is at least 1 s of steps per engine: --round-seconds 1),
# CPU, 2 threads, at the issue's sizes (DynUNet and BasicUNet at 16-128: MONAI's defaults are
# twice as wide). Then the two limits (clip-and-sum pass against a copy, noise against randn).
#   bash docs/results/floor26/run.sh [OUT]  (about 20 minutes on 2 idle cores)
set -euo pipefail
# Page size: PyTorch's CPU tensors sit on 4 KiB pages under this kernel's "madvise" THP
# mode; THP_MEM_ALLOC_ENABLE=1 in the caller's environment puts them on 2 MiB pages, for both
# engines (steadier CNN steps, jittery transformer steps here: spread9/README.md). Every
# report records which (environment.huge_pages).
cd "$(dirname "$0")/../../.."
B="${DPSEG:-.venv/bin/dpseg} bench --engines none,dpseg --repeats 15 --round-seconds 1"
O=${1:-docs/results/floor26}  # the output folder (the committed one by default)
M=monai.networks.nets
$B --size 64 --batch 2 --warmup 1 --model $M:SwinUNETR --model-kwargs '{"in_channels": 1, "out_channels": 2, "feature_size": 12}' --out $O/swinunetr
$B --size 64 --batch 2 --warmup 1 --model $M:UNETR --model-kwargs '{"in_channels": 1, "out_channels": 2, "img_size": [64, 64, 64], "feature_size": 16, "hidden_size": 192, "mlp_dim": 768, "num_heads": 4}' --out $O/unetr
$B --size 48 --batch 2 --model $M:UNet --model-kwargs '{"spatial_dims": 3, "in_channels": 1, "out_channels": 2, "channels": [16, 32, 64, 128], "strides": [2, 2, 2], "num_res_units": 2}' --out $O/unet
$B --size 48 --batch 2 --model $M:SegResNet --model-kwargs '{"spatial_dims": 3, "in_channels": 1, "out_channels": 2, "init_filters": 16}' --out $O/segresnet
$B --size 48 --batch 2 --model $M:DynUNet --model-kwargs '{"spatial_dims": 3, "in_channels": 1, "out_channels": 2, "kernel_size": [3, 3, 3, 3], "strides": [1, 2, 2, 2], "upsample_kernel_size": [2, 2, 2], "filters": [16, 32, 64, 128]}' --out $O/dynunet
$B --size 48 --batch 2 --model $M:BasicUNet --model-kwargs '{"spatial_dims": 3, "in_channels": 1, "out_channels": 2, "features": [16, 16, 32, 64, 128, 16]}' --out $O/basicunet
# The UNet again with every conv input gradient by ATen's backward-data, as the non-private
# step computes it: what dpseg's choice of a forward conv for it (few-channel layers) gains.
DPSEG_CONV_INPUT_GRAD=backward $B --size 48 --batch 2 --model $M:UNet --model-kwargs '{"spatial_dims": 3, "in_channels": 1, "out_channels": 2, "channels": [16, 32, 64, 128], "strides": [2, 2, 2], "num_res_units": 2}' --out $O/unet_backward_data
${PY:-.venv/bin/python} bench/limits_cpu.py --threads 2 --rounds 15 --out $O/limits
