"""`dpseg predict`: a trained checkpoint segments one NIfTI image, and the mask is written
back on the image's own shape and affine (reorientation and resampling undone)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from dpseg.data import Preprocessing, resample_to_shape
from dpseg.models import UNet
from dpseg.train.checkpoint import load_checkpoint
from dpseg.train.config import TrainConfig
from dpseg.train.loop import predict_volume
from dpseg.train.postprocess import keep_largest_component
from dpseg.train.run import _check_out


def load_trained_model(checkpoint: str | Path, device: str | torch.device = "cpu"):
    """(plain model in eval mode, TrainConfig, checkpoint dict) from RUN/checkpoint.pt."""
    ckpt = load_checkpoint(checkpoint, map_location="cpu")
    cfg = TrainConfig.from_dict(ckpt["config"])
    args = dict(ckpt["model_args"])
    model = UNet(**{**args, "channels": tuple(args["channels"])})
    model.load_state_dict(ckpt["model"])
    return model.to(device).eval(), cfg, ckpt


def checkpoint_preprocessing(ckpt: dict) -> Preprocessing:
    """The preprocessing the checkpoint's run applied to its training cases."""
    pp = ckpt["preprocessing"]
    spacing = tuple(pp["target_spacing"]) if pp.get("target_spacing") else None
    kwargs = {"percentiles": tuple(pp["percentiles"])} if pp.get("percentiles") else {}
    return Preprocessing(
        normalize=pp["normalize"], window=tuple(pp["window"]), target_spacing=spacing, **kwargs
    )


def predict_file(
    checkpoint: str | Path,
    image: str | Path,
    out: str | Path,
    device: str | torch.device = "cpu",
    overlap: float | None = None,
    channel: int | None = None,
    progress: bool = False,
    largest_component: bool = False,
) -> Path:
    """Segment one NIfTI image and write the mask on the image's own shape and affine.

    The image gets the run's preprocessing (canonical orientation, intensity window and, if
    the run resampled, its voxel spacing); the class probabilities are resampled back to the
    canonical grid (linear) before the argmax, and `save_like` undoes the reorientation.
    ``largest_component`` keeps only each organ's largest connected component
    (`keep_largest_component`), removing false-positive islands.
    """
    from dpseg.data import load_nifti, save_like

    model, cfg, ckpt = load_trained_model(checkpoint, device)
    out = Path(out)
    _check_out(out.parent)
    volume = load_nifti(image, channel=cfg.channel if channel is None else channel)
    img, _, _ = checkpoint_preprocessing(ckpt).apply(volume)
    scores = predict_volume(
        model, img, cfg.patch, cfg.spatial_dims, cfg.overlap if overlap is None else overlap, device
    )
    if tuple(scores.shape[1:]) != volume.shape:
        scores = torch.from_numpy(
            np.stack([resample_to_shape(s.numpy(), volume.shape, order=1) for s in scores])
        )
    mask = scores.argmax(0).numpy().astype(np.uint8)
    if largest_component:
        mask = keep_largest_component(mask, scores.shape[0])
    return save_like(mask, volume, out)
