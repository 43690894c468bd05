"""A DP-compatible U-Net for 2D and 3D segmentation.

DP-SGD clips each sample's gradient on its own, so no layer may mix samples of a batch:
there is no BatchNorm here, only GroupNorm or InstanceNorm (affine), whose statistics are
computed per sample. Every layer is a Conv, ConvTranspose or norm that the privacy engine
has a per-sample rule for.

Parameter counts (checked by tests/test_models.py):

- ``UNet(3, 1, 2, channels=(16, 32, 64), norm="group")``: 339,906 parameters
  (the CPU benchmark model, 64^3 patches).
- ``UNet(3, 1, 2, channels=(32, 64, 128, 256), norm="group")``: 5,602,562 parameters
  (the GPU benchmark model, 128^3 patches).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["UNet"]

_NORMS = ("group", "instance")
_UPSAMPLES = ("transpose", "interp")


def _conv(spatial_dims: int) -> type[nn.Module]:
    return nn.Conv3d if spatial_dims == 3 else nn.Conv2d


def _group_count(channels: int, num_groups: int) -> int:
    """Largest divisor of ``channels`` not above ``min(num_groups, channels)``."""
    g = max(1, min(num_groups, channels))
    while channels % g:
        g -= 1
    return g


def _norm(kind: str, spatial_dims: int, channels: int, num_groups: int) -> nn.Module:
    if kind == "group":
        return nn.GroupNorm(_group_count(channels, num_groups), channels, affine=True)
    inorm = nn.InstanceNorm3d if spatial_dims == 3 else nn.InstanceNorm2d
    # track_running_stats=False: statistics always come from the sample itself, in train
    # and eval alike, so no state is shared across samples (or across patients).
    return inorm(channels, affine=True, track_running_stats=False)


class ConvBlock(nn.Sequential):
    """``n`` x (Conv k=3 pad=1 -> norm -> LeakyReLU)."""

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        out_channels: int,
        norm: str,
        num_groups: int,
        n: int,
    ) -> None:
        layers: list[nn.Module] = []
        conv = _conv(spatial_dims)
        for i in range(n):
            layers.append(conv(in_channels if i == 0 else out_channels, out_channels, 3, 1, 1))
            layers.append(_norm(norm, spatial_dims, out_channels, num_groups))
            # Not in place: capture hooks may hold a layer's input, and an in-place
            # activation would overwrite a norm output that autograd or a hook still needs.
            layers.append(nn.LeakyReLU(0.01))
        super().__init__(*layers)


class Up(nn.Module):
    """Doubles the spatial size and maps ``in_channels`` to ``out_channels``."""

    def __init__(self, spatial_dims: int, in_channels: int, out_channels: int, mode: str):
        super().__init__()
        self.mode = mode
        if mode == "transpose":
            tconv = nn.ConvTranspose3d if spatial_dims == 3 else nn.ConvTranspose2d
            self.proj = tconv(in_channels, out_channels, kernel_size=2, stride=2)
        else:
            self.proj = _conv(spatial_dims)(in_channels, out_channels, kernel_size=1)
        self._interp = "trilinear" if spatial_dims == 3 else "bilinear"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "transpose":
            return self.proj(x)
        # 1x1 conv first, then interpolate: linear interpolation and a 1x1 conv commute
        # exactly (both are linear, and the interpolation weights sum to 1 so the bias passes
        # through), and this order runs the conv, and the engine's per-sample norm for it, on
        # 2^D times fewer voxels.
        return F.interpolate(self.proj(x), scale_factor=2.0, mode=self._interp, align_corners=False)


class UNet(nn.Module):
    """U-Net returning raw logits of shape ``(B, out_channels, *S)``.

    Args:
        spatial_dims: 2 or 3.
        in_channels: image channels (1 for CT).
        out_channels: classes (background included).
        channels: feature channels per level; the last one is the bottleneck. Inputs must
            have every spatial size divisible by ``2 ** (len(channels) - 1)``.
        norm: ``"group"`` (GroupNorm) or ``"instance"`` (InstanceNorm, affine). Never
            BatchNorm: it couples the samples of a batch and breaks per-sample clipping.
        upsample: ``"transpose"`` (ConvTranspose k=2 s=2) or ``"interp"`` (linear
            interpolation and a 1x1 conv; run conv-first, which is the same map).
        num_groups: GroupNorm groups, capped at the channel count; when it does not divide
            the channels, the largest divisor below it is used (e.g. 8 groups -> 6 for 12
            channels).
        convs_per_level: conv-norm-activation units per level.
        seed: initialisation seed. Init draws from its own generator, so two models built
            with the same arguments are identical whatever the global RNG state.

    Parameter counts: ``UNet(3, 1, 2, (16, 32, 64), "group")`` has 339,906;
    ``UNet(3, 1, 2, (32, 64, 128, 256), "group")`` has 5,602,562.
    """

    def __init__(
        self,
        spatial_dims: int = 3,
        in_channels: int = 1,
        out_channels: int = 2,
        channels: Sequence[int] = (16, 32, 64),
        norm: str = "group",
        upsample: str = "transpose",
        num_groups: int = 8,
        convs_per_level: int = 2,
        seed: int = 0,
    ) -> None:
        super().__init__()
        channels = tuple(int(c) for c in channels)
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
        if not channels or min(channels) < 1:
            raise ValueError(f"channels must be a non-empty sequence of positive ints: {channels}")
        if in_channels < 1 or out_channels < 1:
            raise ValueError(
                f"in_channels and out_channels must be >= 1, got {in_channels}, {out_channels}"
            )
        if norm not in _NORMS:
            raise ValueError(f"norm must be one of {_NORMS} (no BatchNorm under DP), got {norm!r}")
        if upsample not in _UPSAMPLES:
            raise ValueError(f"upsample must be one of {_UPSAMPLES}, got {upsample!r}")
        if num_groups < 1 or convs_per_level < 1:
            raise ValueError("num_groups and convs_per_level must be >= 1")

        self.spatial_dims = spatial_dims
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.channels = channels
        self.divisor = 2 ** (len(channels) - 1)

        def block(cin: int, cout: int) -> ConvBlock:
            return ConvBlock(spatial_dims, cin, cout, norm, num_groups, convs_per_level)

        # Encoder (the last entry is the bottleneck), with max-pooling between levels.
        # Max-pool rather than a stride-2 conv: it has no parameters, so the engine has
        # fewer layers to compute per-sample norms for and the clipping budget is not spread
        # over extra weights; the strided conv's extra 2^D x C^2 weights per level buy little
        # in a U-Net whose skips already carry the full-resolution detail.
        self.encoder = nn.ModuleList()
        cin = in_channels
        for c in channels:
            self.encoder.append(block(cin, c))
            cin = c
        self.pool = (nn.MaxPool3d if spatial_dims == 3 else nn.MaxPool2d)(2)

        # Decoder: up from level i+1 to level i, concatenate the skip, conv block.
        self.ups = nn.ModuleList()
        self.decoder = nn.ModuleList()
        for i in reversed(range(len(channels) - 1)):
            self.ups.append(Up(spatial_dims, channels[i + 1], channels[i], upsample))
            self.decoder.append(block(2 * channels[i], channels[i]))
        self.head = _conv(spatial_dims)(channels[0], out_channels, kernel_size=1)

        self.reset_parameters(seed)

    @torch.no_grad()
    def reset_parameters(self, seed: int = 0) -> None:
        """Deterministic init: Kaiming-normal conv weights, zero biases, unit norm scales."""
        gen = torch.Generator().manual_seed(seed)
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Conv3d, nn.ConvTranspose2d, nn.ConvTranspose3d)):
                # Drawn on CPU then copied, so the values do not depend on the device.
                w = torch.empty(m.weight.shape, dtype=torch.float32)
                nn.init.kaiming_normal_(w, a=0.01, nonlinearity="leaky_relu", generator=gen)
                m.weight.copy_(w)
                if m.bias is not None:
                    m.bias.zero_()
            elif isinstance(m, (nn.GroupNorm, nn.InstanceNorm2d, nn.InstanceNorm3d)):
                if m.weight is not None:
                    m.weight.fill_(1.0)
                    m.bias.zero_()

    def check_input(self, x: torch.Tensor) -> None:
        """Raise ValueError naming what is wrong with ``x``'s shape."""
        if x.dim() != self.spatial_dims + 2:
            raise ValueError(
                f"UNet(spatial_dims={self.spatial_dims}) expects input (B, C, "
                f"{', '.join('S' * self.spatial_dims)}) with {self.spatial_dims + 2} dims, "
                f"got shape {tuple(x.shape)}"
            )
        if x.shape[1] != self.in_channels:
            raise ValueError(
                f"UNet expects {self.in_channels} input channel(s), got {x.shape[1]} "
                f"(shape {tuple(x.shape)})"
            )
        size = tuple(x.shape[2:])
        if any(s % self.divisor for s in size):
            raise ValueError(
                f"UNet with {len(self.channels)} levels needs every spatial size divisible by "
                f"{self.divisor} (= 2**{len(self.channels) - 1}); got spatial size {size}. "
                f"Pad or crop the input to a multiple of {self.divisor}."
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input(x)
        skips = []
        for i, enc in enumerate(self.encoder):
            if i > 0:
                x = self.pool(x)
            x = enc(x)
            skips.append(x)
        skips.pop()  # the bottleneck output is x itself
        for up, dec in zip(self.ups, self.decoder, strict=True):
            x = dec(torch.cat([up(x), skips.pop()], dim=1))
        return self.head(x)
