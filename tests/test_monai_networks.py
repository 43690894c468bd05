"""MONAI's networks under dpseg, held against the float64 microbatch oracle: every
parameter's per-sample gradient, PReLU through its closed form, and the parameters MONAI's
transformers own beside submodules (UNETR's position embedding, SwinUNETR's relative-position
bias tables inside its windowed blocks) through torch.func."""

from __future__ import annotations

import warnings

import pytest
import torch

from tests.test_engine_oracle import assert_grad_samples, seg_loss_sum

nets = pytest.importorskip("monai.networks.nets")
pytest.importorskip("einops")

# Small configurations: a few channels, 32^3 (SwinUNETR 64^3: its deepest level is 1/32).
NETWORKS = {
    "UNet": (lambda: nets.UNet(3, 1, 2, channels=(4, 8, 16), strides=(2, 2), num_res_units=1), 32),
    "BasicUNet": (lambda: nets.BasicUNet(3, 1, 2, features=(4, 4, 8, 8, 16, 4)), 32),
    "SegResNet": (
        lambda: nets.SegResNet(3, init_filters=4, in_channels=1, out_channels=2,
                               norm=("GROUP", {"num_groups": 2})),
        32,
    ),
    "DynUNet": (
        lambda: nets.DynUNet(3, 1, 2, kernel_size=[3, 3, 3], strides=[1, 2, 2],
                             upsample_kernel_size=[2, 2], filters=[4, 8, 16]),
        32,
    ),
    "UNETR": (
        lambda: nets.UNETR(1, 2, (32, 32, 32), feature_size=4, hidden_size=24, mlp_dim=48,
                           num_heads=2),
        32,
    ),
    "SwinUNETR": (
        lambda: nets.SwinUNETR(1, 2, feature_size=12, depths=(1, 1, 1, 1),
                               num_heads=(1, 1, 1, 1)),
        64,
    ),
}  # fmt: skip


@pytest.mark.parametrize("name", list(NETWORKS))
def test_monai_network_per_sample_grads_match_the_oracle(name):
    make, size = NETWORKS[name]
    torch.manual_seed(0)
    model = make().double()
    with torch.no_grad():  # away from init: affine norms and biases with real gradients
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    x = torch.randn(2, 1, size, size, size, dtype=torch.float64)
    y = torch.randint(0, 2, (2, size, size, size))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert_grad_samples(model, x, loss_fn=seg_loss_sum, y=y, rtol=1e-8)
