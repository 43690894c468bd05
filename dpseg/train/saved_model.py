"""A saved model ready to score: a `dpseg train` checkpoint (RUN/checkpoint.pt) or a
`dpseg federate` one (RUN/checkpoint_<engine>.pt, the global model), with what `dpseg
evaluate` needs from it: the network, its patch and sliding window, its preprocessing, the
cases it saw, and the privacy guarantee read from its ledger(s).

Privacy: a `dpseg train` checkpoint holds the engine's ledger (accountant and its steps; the
engine now also records "unit" and "adjacency"). A federated one holds each site's ledger:
each site's guarantee is about its own cases, and the one reported is the largest over sites
(with every site's beside it). Epsilon is recomputed by the ledger's accountant over its
recorded steps. Without DP every value is None.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dpseg.data import DataError, MSDDataset, Preprocessing

__all__ = ["SavedModel", "ledger_privacy", "load_saved_model", "model_label"]

# What a ledger written before it recorded its unit and adjacency meant: one row (one patch)
# per case per Poisson draw, so the case; add/remove adjacency (Poisson sampling).
DEFAULT_UNIT, DEFAULT_ADJACENCY = "case", "add/remove"


def _make_accountant(name: str):
    try:  # the engine's own names (replace-one, shuffled) where it has them
        from dpseg.privacy.accountants import make_accountant
    except ImportError:
        from opacus.accountants import create_accountant as make_accountant
    return make_accountant(name)


def _epsilon(accountant: str, history: list, delta: float) -> float:
    if not history:
        return 0.0
    acc = _make_accountant(accountant)
    acc.history = [tuple(h) for h in history]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return float(acc.get_epsilon(delta=delta))


def _none() -> dict[str, Any]:
    keys = ("epsilon", "delta", "unit", "adjacency", "sampling", "accountant", "noise_multiplier")
    return dict.fromkeys((*keys, "sample_rate", "dp_steps"))


def _from_ledger(ledger: Mapping[str, Any], delta: float) -> dict[str, Any]:
    name = ledger.get("accountant", ledger.get("mechanism"))
    history = [tuple(h) for h in ledger.get("history", [])]
    delta = float(ledger.get("delta", delta))
    out = {
        "epsilon": _epsilon(name, history, delta),
        "delta": delta,
        "unit": ledger.get("unit", DEFAULT_UNIT),
        "adjacency": ledger.get("adjacency", DEFAULT_ADJACENCY),
        "sampling": ledger.get("sampling", "poisson"),
        "accountant": name,
        "dp_steps": int(sum(h[2] for h in history)),
    }
    inferred = [k for k in ("unit", "adjacency", "sampling") if k not in ledger]
    if inferred:
        out["inferred"] = inferred
    return out


def ledger_privacy(ckpt: Mapping[str, Any]) -> dict[str, Any]:
    """{"epsilon", "delta", "unit", "adjacency", "sampling", "accountant", "noise_multiplier",
    "sample_rate", "dp_steps"} (and "inferred": the keys an older ledger lacked) of a
    `dpseg train` checkpoint; all None without DP."""
    cfg = ckpt.get("config", {})
    privacy = ckpt.get("privacy") or {}
    ledger = privacy.get("ledger")
    out = _none()
    if not cfg.get("dp", True) or not ledger:
        return out
    out.update(_from_ledger(ledger, float(cfg.get("delta", 1e-5))))
    out["noise_multiplier"] = privacy.get("noise_multiplier")
    out["sample_rate"] = privacy.get("sample_rate")
    return out


def federated_privacy(ckpt: Mapping[str, Any]) -> dict[str, Any]:
    """The same for a federated checkpoint: the largest epsilon over sites, with
    "epsilon_per_site" and, under client-level DP, "client_epsilon"."""
    cfg = ckpt.get("extra", {}).get("config", {})
    out = _none()
    per_site = {}
    for name, site in ckpt.get("sites", {}).items():
        if site.get("ledger"):
            per_site[name] = _from_ledger(site["ledger"], float(cfg.get("delta", 1e-5)))
            per_site[name]["noise_multiplier"] = site.get("noise_multiplier")
    if per_site:
        worst = max(per_site.values(), key=lambda p: p["epsilon"])
        out.update(worst)
        out["epsilon_per_site"] = {n: p["epsilon"] for n, p in per_site.items()}
    server = ckpt.get("server_ledger")
    if server:
        out["client_epsilon"] = _from_ledger(server, float(cfg.get("delta", 1e-5)))["epsilon"]
    return out


def model_label(privacy: Mapping[str, Any]) -> str:
    """What a panel or a table calls the model: "non-private" or "DP eps 7.99"."""
    if privacy.get("epsilon") is None:
        return "non-private"
    return f"DP eps {privacy['epsilon']:.2f}"


@dataclass
class SavedModel:
    """A network in eval mode and how to run it; `preprocessing(dataset)` is the run's."""

    path: Path
    kind: str  # "train" or "federated"
    model: nn.Module
    out_channels: int
    patch: int
    spatial_dims: int
    overlap: float
    channel: int | None
    privacy: dict[str, Any]
    seen: set[str]  # cases trained or validated on (as far as the checkpoint tells)
    train_config: dict[str, Any] = field(default_factory=dict)
    steps: int = 0
    # Windows blended as probabilities (dpseg train's validation, dpseg predict) or as logits
    # (dpseg federate's evaluation): each model is scored as its own run scored it.
    softmax: bool = True
    _prep: Preprocessing | None = None
    _normalize: str = "auto"

    @property
    def label(self) -> str:
        return model_label(self.privacy)

    def preprocessing(self, dataset: MSDDataset) -> Preprocessing:
        if self._prep is not None:
            return self._prep
        from dpseg.federated.sitedata import site_preprocessing

        return site_preprocessing(dataset, self._normalize)

    def check_dataset(self, dataset: MSDDataset) -> None:
        if dataset.num_classes != self.out_channels:
            raise DataError(
                f"{dataset.json_path}: declares {dataset.num_classes} classes (labels "
                f"{sorted(dataset.labels)}) but the checkpoint {self.path} predicts "
                f"{self.out_channels}. Score it on a dataset with the labels it was trained on."
            )


def load_saved_model(path: str | Path, device: str | torch.device = "cpu") -> SavedModel:
    """Either kind of checkpoint; DataError naming the file if it is neither."""
    from dpseg.train.checkpoint import load_checkpoint

    path = Path(path)
    ckpt = load_checkpoint(path)
    if "federated" in ckpt:
        return _federated(path, ckpt, device)
    if "model_args" not in ckpt:
        raise DataError(
            f"{path}: a dpseg checkpoint without a model (not from `dpseg train` or "
            "`dpseg federate`); give RUN/checkpoint.pt or RUN/checkpoint_<engine>.pt."
        )
    from dpseg.models import UNet
    from dpseg.train.config import TrainConfig
    from dpseg.train.predict import checkpoint_preprocessing

    cfg = TrainConfig.from_dict(ckpt["config"])
    args = dict(ckpt["model_args"])
    model = UNet(**{**args, "channels": tuple(args["channels"])})
    model.load_state_dict(ckpt["model"])
    split = ckpt.get("split") or {}
    keys = ("dp", "steps", "patch", "batch", "channels", "lr", "lr_schedule", "seed", "split")
    return SavedModel(
        path, "train", model.to(device).eval(), int(args["out_channels"]), cfg.patch,
        cfg.spatial_dims, cfg.overlap, cfg.channel, ledger_privacy(ckpt),
        set(split.get("train", [])) | set(split.get("val", [])),
        {k: cfg.as_dict().get(k) for k in keys}, int(ckpt.get("step", 0)),
        _prep=checkpoint_preprocessing(ckpt),
    )  # fmt: skip


def _federated(path: Path, ckpt: dict, device) -> SavedModel:
    from dpseg.models import UNet

    cfg = ckpt.get("extra", {}).get("config")
    weights = ckpt.get("weights") or {}
    if not cfg or not weights:
        raise DataError(
            f"{path}: a federated checkpoint without its run's settings or global weights; "
            "give the RUN/checkpoint_<engine>.pt that `dpseg federate` wrote."
        )
    if "head.weight" not in weights:
        raise DataError(f"{path}: its global weights hold no U-Net head (head.weight).")
    out_channels = int(weights["head.weight"].shape[0])
    model = UNet(
        cfg.get("spatial_dims", 3), 1, out_channels, channels=tuple(cfg["channels"]),
        norm=cfg.get("norm", "group"), upsample=cfg.get("upsample", "interp"),
    )  # fmt: skip
    missing, unexpected = model.load_state_dict(weights, strict=False)
    if unexpected or any(k in dict(model.named_parameters()) for k in missing):
        raise DataError(
            f"{path}: its weights do not fit a U-Net with channels {cfg['channels']} "
            f"({len(unexpected)} unexpected, {len(missing)} missing tensors)."
        )
    seen: set[str] = set()
    if cfg.get("split"):
        try:
            from dpseg.train.splits import read_case_list

            seen = set(read_case_list(cfg["split"]))
        except DataError as err:
            # The checkpoint names its split by path only; without the file, which cases the
            # model trained on is unknown, so scoring cannot check for overlap: say so.
            warnings.warn(
                f"{path}: the federated run's split file {cfg['split']!r} cannot be read "
                f"({err}); which cases this model trained on is unknown, so the scores "
                "cannot be checked for overlap with its training cases.",
                stacklevel=2,
            )
    keys = ("rounds", "local_steps", "patch", "batch_size", "channels", "lr", "dp_lr", "seed",
            "split", "partition", "sites")  # fmt: skip
    return SavedModel(
        path, "federated", model.to(device).eval(), out_channels, int(cfg["patch"]),
        int(cfg.get("spatial_dims", 3)), float(cfg.get("eval_overlap", 0.25)), None,
        federated_privacy(ckpt), seen, {k: cfg.get(k) for k in keys}, int(ckpt.get("round", 0)),
        softmax=False, _normalize=cfg.get("normalize", "auto"),
    )  # fmt: skip
