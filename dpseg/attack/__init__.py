"""Gradient inversion of a site's shared update, and what clipping and DP noise leave of it.

    from dpseg.attack import reconstruct, shared_update, parse_defence, random_update, ssim

- ``shared_update``: what a site sends for a batch (gradient or weights after local steps),
  undefended or through dpseg's engine (``clip``, ``dp:SIGMA``).
- ``reconstruct``: gradient matching (cosine over all layers, TV prior, signed Adam, box,
  restarts; mask known or optimised jointly), for gradients and local updates.
- ``random_update``: the baseline update (an isotropic random direction, the same norm).
- ``ssim`` / ``psnr`` / ``mse``: how close a reconstruction is to the original.
- ``experiment.path_profile`` / ``identifiability``: why a reconstruction falls short (the
  gradient distance on the line to the original; the update's Jacobian at the original).
"""

from .defences import Defence, parse_defence, parse_defences, random_update, shared_update
from .inversion import (
    InversionConfig,
    InversionResult,
    ThreatModel,
    gradient_distance,
    reconstruct,
    simulate_update,
    total_variation,
)
from .metrics import mse, psnr, ssim

__all__ = [
    "Defence",
    "InversionConfig",
    "InversionResult",
    "ThreatModel",
    "gradient_distance",
    "mse",
    "parse_defence",
    "parse_defences",
    "psnr",
    "random_update",
    "reconstruct",
    "shared_update",
    "simulate_update",
    "ssim",
    "total_variation",
]
