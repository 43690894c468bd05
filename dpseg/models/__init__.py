"""DP-compatible segmentation models (no BatchNorm)."""

from dpseg.models.unet import UNet

__all__ = ["UNet"]
