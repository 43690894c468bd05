"""Losses, metrics, inference, and single-site training (loop, checkpoints, report).

The training building blocks are re-exported lazily, so `import dpseg.train.losses` stays
light (no matplotlib, no data layer)."""

from __future__ import annotations

_LOOP = (
    "TrainConfig", "build_model", "build_optimizer", "split_cases", "load_cases", "make_loader",
    "privatize", "reseed_step", "lr_at", "local_train", "evaluate", "predict_volume",
    "predict_file", "load_trained_model", "unwrap", "run_training",
)  # fmt: skip
_CHECKPOINT = ("save_checkpoint", "load_checkpoint")

__all__ = [*_LOOP, *_CHECKPOINT]


def __getattr__(name: str):
    if name in _LOOP:
        from dpseg.train import loop

        return getattr(loop, name)
    if name in _CHECKPOINT:
        from dpseg.train import checkpoint

        return getattr(checkpoint, name)
    raise AttributeError(f"module 'dpseg.train' has no attribute {name!r}")
