"""Which nnU-Net dpseg runs under, and the message when it is not installed.

nnunetv2 2.8.1 depends on dynamic-network-architectures 0.4.4, which depends on timm, which
depends on torchvision, which pins a torch release: installing nnunetv2 with its
dependencies replaces the project's torch (2.13.0 CPU) with torch 2.14.1 and its CUDA
libraries (5.35 GB unpacked, 2.96 GB of wheels, measured from the wheels pip would
install). timm is imported only by the transformer networks of dynamic-network-architectures
(Primus, EVA, DINOv2), never by PlainConvUNet or ResidualEncoderUNet, the networks nnU-Net
plans. So ``dpseg[nnunet]`` installs nnU-Net's runtime dependencies except timm and
torchvision (+589 MB, about a minute), and nnunetv2 and dynamic-network-architectures
themselves come with ``--no-deps`` at the versions below (``make nnunet`` runs both).
"""

from __future__ import annotations

import importlib.metadata
import importlib.util

NNUNET_VERSION = "2.8.1"
DNA_VERSION = "0.4.4"  # dynamic-network-architectures

INSTALL_COMMAND = (
    "pip install 'dpseg[nnunet]' && pip install --no-deps "
    f"nnunetv2=={NNUNET_VERSION} dynamic-network-architectures=={DNA_VERSION}"
    "   (in a checkout: make nnunet)"
)

# What `import nnunetv2.training.nnUNetTrainer.nnUNetTrainer` needs beyond the base install.
_MODULES = {
    "nnunetv2": "nnunetv2",
    "dynamic_network_architectures": "dynamic-network-architectures",
    "batchgenerators": "batchgenerators",
    "batchgeneratorsv2": "batchgeneratorsv2",
    "acvl_utils": "acvl-utils",
    "SimpleITK": "SimpleITK",
    "blosc2": "blosc2",
}


class NnUNetMissingError(ImportError):
    """nnU-Net (or one of its runtime dependencies) is not installed, or not the tested one."""


def missing_modules() -> list[str]:
    return [dist for module, dist in _MODULES.items() if importlib.util.find_spec(module) is None]


def require_nnunet() -> None:
    """Raises NnUNetMissingError, saying the install command, unless the tested nnU-Net is
    importable. The DP trainer overrides nnU-Net's data loading, loss, step and checkpoint
    hooks as 2.8 defines them; another release may call them differently, so it is refused
    rather than trusted to still route every step through the DP optimizer."""
    missing = missing_modules()
    if missing:
        raise NnUNetMissingError(
            f"dpseg nnunet needs nnU-Net v2 {NNUNET_VERSION}, and {', '.join(missing)} "
            f"{'is' if len(missing) == 1 else 'are'} not installed. Install it without "
            f"replacing your torch with:\n  {INSTALL_COMMAND}"
        )
    version = importlib.metadata.version("nnunetv2")
    if version.split(".")[:2] != NNUNET_VERSION.split(".")[:2]:
        raise NnUNetMissingError(
            f"dpseg nnunet is tested with nnunetv2 {NNUNET_VERSION}; this environment has "
            f"{version}, whose trainer hooks may differ. Install the tested release with:\n  "
            f"pip install --no-deps nnunetv2=={NNUNET_VERSION}"
        )


def nnunet_available() -> bool:
    try:
        require_nnunet()
    except NnUNetMissingError:
        return False
    return True
