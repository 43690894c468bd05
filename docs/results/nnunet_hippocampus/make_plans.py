"""nnUNetPlans_cpu: nnU-Net's own 3d_fullres plans for the hippocampus with a quarter of
the features in every stage (8-16-32-64 instead of 32-64-128-256: 0.35 M parameters instead
of 5.6 M). Everything else (patch 40 x 56 x 40, batch 6, 4 stages, InstanceNorm, LeakyReLU,
deep supervision, the normalisation) is the planner's. Measured here on one CPU thread, a
forward and backward of a batch of 6 takes 2.1 s at this width and 22 s at the planned one:
the planned network does not train on 2 cores in this session's budget, and narrower is
also what DP wants (the noise norm grows with the square root of the parameter count).

    python docs/results/nnunet_hippocampus/make_plans.py   # needs nnUNet_preprocessed
"""

import json
import os
from pathlib import Path

folder = Path(os.environ["nnUNet_preprocessed"]) / "Dataset004_Hippocampus"
plans = json.loads((folder / "nnUNetPlans.json").read_text())
arch = plans["configurations"]["3d_fullres"]["architecture"]["arch_kwargs"]
arch["features_per_stage"] = [f // 4 for f in arch["features_per_stage"]]
plans["plans_name"] = "nnUNetPlans_cpu"
(folder / "nnUNetPlans_cpu.json").write_text(json.dumps(plans, indent=1))
print(folder / "nnUNetPlans_cpu.json", arch["features_per_stage"])
