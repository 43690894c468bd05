"""The Flower run configuration of a dpseg run, and what the client and server both read of
it: the ``FederatedConfig``, torch's thread count, the model."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import torch
from flwr.app import Context

from dpseg.federated.runner import FederatedConfig

__all__ = ["load_config", "model_fn", "run_config_for", "set_threads"]


def run_config_for(
    cfg: FederatedConfig, out: str | Path, num_sites: int, *, plots: bool = True, threads: int = 0
) -> dict:
    """The Flower run config of a dpseg run (flat scalars, as Flower requires)."""
    unsupported = [flag for flag, on in (("--train-sites", bool(cfg.train_sites)),
                                         ("--eval-every", cfg.eval_every != 1)) if on]  # fmt: skip
    if unsupported:
        raise ValueError(
            f"{', '.join(unsupported)}: not carried out on --runtime flower (every site trains "
            "and is evaluated each round there); use the simulator"
        )
    cfg.check_secagg(num_sites)
    return {
        "dpseg-config": json.dumps(asdict(cfg)),
        "out": str(Path(out).resolve()),
        "num-sites": int(num_sites),
        "plots": bool(plots),
        "threads": int(threads),
        "connect-timeout": 120.0,
        # How long the server waits for a round's replies before it counts a site as
        # dropped out; a site whose node restarts meanwhile is asked again (retries times).
        "round-timeout": 3600.0,
        "retries": 2,
        "resume": False,
        # A folder where the ServerApp writes every message it sends and receives (tests and
        # audits: what the coordinator sees); "" writes none. Byte counts are always kept.
        "record-traffic": "",
    }


def load_config(context: Context) -> FederatedConfig:
    return FederatedConfig.from_dict(json.loads(str(context.run_config["dpseg-config"])))


def set_threads(context: Context) -> None:
    n = int(context.run_config.get("threads", 0))
    if n > 0:
        torch.set_num_threads(n)


def model_fn(cfg: FederatedConfig, num_classes: int):
    from dpseg.models import UNet

    def make():
        return UNet(
            cfg.spatial_dims, 1, num_classes, channels=cfg.channels, norm=cfg.norm,
            upsample=cfg.upsample, seed=cfg.seed,
        )  # fmt: skip

    return make
