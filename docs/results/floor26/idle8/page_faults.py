"""Minor page faults and system time per step, SegResNet (init 16, 48^3, batch 2), the
non-private step against dpseg's, in one process, three rounds of three steps each.

    .venv/bin/python docs/results/floor26/idle8/page_faults.py
"""

from __future__ import annotations

import resource
import time
import warnings

import torch
from monai.networks.nets import SegResNet
from torch.utils.data import DataLoader, TensorDataset

from dpseg.privacy import PrivacyEngine

warnings.filterwarnings("ignore")
torch.manual_seed(0)


def build():
    return SegResNet(spatial_dims=3, in_channels=1, out_channels=2, init_filters=16)


x = torch.randn(64, 1, 48, 48, 48)
y = torch.randint(0, 2, (64, 48, 48, 48))
plain = build()
plain_opt = torch.optim.SGD(plain.parameters(), lr=0.01)
model = build()
private, private_opt, _ = PrivacyEngine().make_private(
    module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.01),
    data_loader=DataLoader(TensorDataset(x, y), batch_size=2), noise_multiplier=1.0,
    max_grad_norm=1.0, poisson_sampling=False,
)  # fmt: skip
xb, yb = x[:2], y[:2]


def step(m, opt):
    opt.zero_grad()
    torch.nn.functional.cross_entropy(m(xb), yb).backward()
    opt.step()


for _ in range(3):
    step(plain, plain_opt)
    step(private, private_opt)
for name, (m, opt) in [("none", (plain, plain_opt)), ("dpseg", (private, private_opt))] * 3:
    r0, t = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    for _ in range(3):
        step(m, opt)
    r1 = resource.getrusage(resource.RUSAGE_SELF)
    print(
        f"{name:6s} {(time.perf_counter() - t) / 3 * 1e3:.0f} ms a step, "
        f"{(r1.ru_minflt - r0.ru_minflt) / 3:.0f} minor faults a step, "
        f"{(r1.ru_stime - r0.ru_stime) / 3:.3f} s system time a step"
    )
