"""MONAI's networks under dpseg, held against the float64 microbatch oracle: every
parameter's per-sample gradient, PReLU through its closed form, and the parameters MONAI's
transformers own beside submodules (UNETR's position embedding, SwinUNETR's relative-position
bias tables inside its windowed blocks) through their forward overrides, with no replay."""

from __future__ import annotations

import warnings

import pytest
import torch

from tests.test_engine_oracle import assert_grad_samples, seg_loss_sum

nets = pytest.importorskip("monai.networks.nets")
pytest.importorskip("einops")


def _fixed(model):
    from dpseg.privacy import fix

    return fix(model)


# Small configurations: a few channels, 32^3.
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
    # 32^3, its smallest input: the 16^3 tokens of the first stage still fill several padded
    # 7^3 windows, shifted every other block. Its bottleneck is 1^3 there, where InstanceNorm
    # (the default) refuses to train: GroupNorm instead (per-sample norms are tested above).
    "SwinUNETR": (
        lambda: nets.SwinUNETR(1, 2, feature_size=12, depths=(2, 1, 1, 1),
                               num_heads=(1, 1, 1, 1), norm_name=("group", {"num_groups": 3})),
        32,
    ),
    # BatchNorm by default: refused by make_private, run after dpseg.fix (GroupNorm)
    "AttentionUnet (fixed)": (
        lambda: _fixed(nets.AttentionUnet(3, 1, 2, channels=(4, 8, 16), strides=(2, 2))), 32
    ),
    "SegResNetDS (fixed)": (
        lambda: _fixed(nets.SegResNetDS(3, init_filters=4, in_channels=1, out_channels=2,
                                        blocks_down=(1, 1, 1))),
        32,
    ),
    "MedNeXt": (
        lambda: nets.MedNeXt(3, 4, 1, 2, blocks_down=(1, 1, 1, 1), blocks_bottleneck=1,
                             blocks_up=(1, 1, 1, 1)),
        32,
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


def test_window_attention_and_position_embedding_group_patients_without_replay():
    # MONAI's WindowAttention (relative position bias table) and PatchEmbeddingBlock
    # (position embedding) through their forward overrides, inside a model whose batch
    # holds patients of 1-3 rows: each patient's rows' windows summed, clipped as one,
    # against the float64 loop over patients; and no module goes through torch.func.
    import copy

    from monai.networks.blocks.patchembedding import PatchEmbeddingBlock
    from monai.networks.nets.swin_unetr import WindowAttention
    from torch.utils.data import DataLoader

    import dpseg
    from dpseg.data import flatten_collate
    from tests.oracle import dp_sum, per_unit_grads
    from tests.test_privacy_unit import MultiSample, _row_groups

    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = PatchEmbeddingBlock(1, (4, 4, 4), (2, 2, 2), 8, 2, proj_type="conv")
            self.attn = WindowAttention(8, 2, (2, 2, 1))  # windows of 4 tokens
            self.head = torch.nn.Linear(8, 2)

        def forward(self, x):
            t = self.embed(x)  # (B, 8 tokens, 8 features)
            b = t.shape[0]
            w = self.attn(t.reshape(b * 2, 4, 8), None)  # 2 windows a sample, batch-major
            return self.head(w.reshape(b, 8, 8)).mean(1)  # (B, 2)

    def loss(out, _y):
        return (out**2).sum(1).mean()

    counts = [2, 1, 3]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(sum(counts), 1, 4, 4, 4, generator=g, dtype=torch.float64)
    y = torch.zeros(sum(counts), 4, 4, 2)
    torch.manual_seed(0)
    model = Tiny().double()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    oracle = copy.deepcopy(model)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pmodel, opt, loader = dpseg.PrivacyEngine().make_private(
            module=model, optimizer=torch.optim.SGD(model.parameters(), lr=1.0),
            data_loader=DataLoader(MultiSample(x, y, counts), batch_size=3,
                                   collate_fn=flatten_collate),
            noise_multiplier=0.0, max_grad_norm=0.05, sample_rate=1.0, expected_batch_size=3,
        )  # fmt: skip
    assert not any("torch.func" in str(w.message) for w in caught)
    xb, yb, rows = next(iter(loader))
    before = torch.cat([p.detach().flatten() for p in model.parameters()])
    loss(pmodel(xb), yb).backward()
    opt.step()
    groups = _row_groups(rows, counts)
    _, summed = dp_sum(per_unit_grads(oracle, loss, x, y, groups), 0.05)
    expected = torch.cat([summed[n].flatten() / 3 for n, _ in oracle.named_parameters()])
    got = before - torch.cat([p.detach().flatten() for p in model.parameters()])
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-14)


def test_monai_networks_with_batchnorm_are_refused_with_the_fix_named():
    # AttentionUnet, VNet, HighResNet and SegResNetDS normalise over the batch by default.
    import dpseg

    model = nets.AttentionUnet(3, 1, 2, channels=(4, 8, 16), strides=(2, 2))
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(torch.randn(2, 1, 8, 8, 8)), batch_size=2
    )
    with pytest.raises(ValueError, match=r"BatchNorm3d.*dpseg\.privacy\.fix"):
        dpseg.PrivacyEngine().make_private(
            module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
            data_loader=loader, noise_multiplier=1.0, max_grad_norm=1.0,
        )  # fmt: skip


def test_a_vit_with_a_class_token_returns_its_tuple_through_torch_func():
    """MONAI's classification ViT owns its class token beside its submodules, so the whole
    ViT is one torch.func unit, and it returns (logits, hidden states): a structured
    output, its gradients handed back in the same structure. A loss of the logits alone
    (the hidden states' gradients are zeros), and one of both."""
    torch.manual_seed(0)
    vit = nets.ViT(1, (16, 16, 16), 4, hidden_size=24, mlp_dim=48, num_layers=2, num_heads=2,
                   classification=True, num_classes=3, qkv_bias=True).double()  # fmt: skip
    with torch.no_grad():
        for p in vit.parameters():
            p.add_(0.05 * torch.randn_like(p))
    x = torch.randn(3, 1, 16, 16, 16, dtype=torch.float64)

    def logits_only(out, _y):
        return (out[0] ** 2).sum()

    def both(out, _y):
        return (out[0] ** 2).sum() + sum((h.sin() ** 2).sum() for h in out[1])

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for loss in (logits_only, both):
            vit.zero_grad(set_to_none=True)
            assert_grad_samples(vit, x, loss_fn=loss, rtol=1e-10)
            for p in vit.parameters():
                p.grad_sample = None


def test_swin_unetr_2d_down_to_a_one_by_one_bottleneck():
    """SwinUNETR 2-D at 32x32 reaches a 1x1 map in channels-last strides, which PyTorch
    calls contiguous; the grouped per-sample conv backward read it as channels-last and
    failed ("grad_weight needs to be contiguous") before dpseg gave such tensors plain
    strides."""
    torch.manual_seed(0)
    model = nets.SwinUNETR(1, 2, feature_size=12, depths=(1, 1, 1, 1), num_heads=(1, 1, 1, 1),
                           norm_name=("group", {"num_groups": 3}), spatial_dims=2)  # fmt: skip
    model = model.double()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    x = torch.randn(3, 1, 32, 32, dtype=torch.float64)
    y = torch.randint(0, 2, (3, 32, 32))

    def loss(pred, y):
        return torch.nn.functional.cross_entropy(pred, y, reduction="none").mean(dim=(1, 2)).sum()

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert_grad_samples(model, x, loss_fn=loss, y=y, rtol=1e-8)
