"""Losses, metrics, inference, and single-site training (loop, checkpoints, report).

The training building blocks are re-exported lazily, so `import dpseg.train.losses` stays
light (no matplotlib, no data layer)."""

from __future__ import annotations

import importlib

_HOME = {
    "TrainConfig": "config",
    **dict.fromkeys(
        (
            "build_model",
            "build_optimizer",
            "split_cases",
            "load_cases",
            "make_loader",
            "privatize",
            "reseed_step",
            "lr_at",
            "local_train",
            "evaluate",
            "predict_volume",
            "unwrap",
        ),
        "loop",
    ),  # fmt: skip
    "run_training": "run",
    **dict.fromkeys(("predict_file", "load_trained_model"), "predict"),
    **dict.fromkeys(("save_checkpoint", "load_checkpoint"), "checkpoint"),
}

__all__ = list(_HOME)


def __getattr__(name: str):
    if name in _HOME:
        return getattr(importlib.import_module(f"dpseg.train.{_HOME[name]}"), name)
    raise AttributeError(f"module 'dpseg.train' has no attribute {name!r}")
