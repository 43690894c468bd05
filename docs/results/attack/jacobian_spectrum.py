"""The singular values quoted in README.md ("Locally the update is informative").

    OMP_NUM_THREADS=1 .venv/bin/python docs/results/attack/jacobian_spectrum.py

liver_0's 64x64 slice (the 2D attack's target), the U-Net 8-16-32 at init, float64; about
3 minutes on one core.
"""

import sys
from pathlib import Path

import torch

from dpseg.attack.experiment import load_target
from dpseg.attack.identifiability import direction_singular_values, update_jacobian
from dpseg.data import MSDDataset
from dpseg.models import UNet
from dpseg.train.losses import DiceCELoss

data = Path(sys.argv[1] if len(sys.argv) > 1 else "../shared/data/liver_ct_mini")
dataset = MSDDataset(data)
target = load_target(dataset, [c.name for c in dataset.cases].index("liver_0"), 2, 64, 1)
model = UNet(2, 1, 2, channels=(8, 16, 32), seed=0).double()
u, jac = update_jacobian(model, DiceCELoss(), target.images.double(), target.labels)
s = direction_singular_values(u, jac)
x = target.images.double().flatten()
print(f"{s.numel()} singular values: largest {s[0]:.3g}, median {s.median():.3g}")
print(f"smallest two: {s[-2]:.3g}, {s[-1]:.3g}")
print(
    f"|J x0| / (|J| |x0|) = {(jac @ x).norm() / (torch.linalg.matrix_norm(jac, 2) * x.norm()):.2e}"
)
