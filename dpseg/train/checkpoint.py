"""Training checkpoints: everything a run needs to continue exactly where it stopped.

A checkpoint holds the plain model's weights (no ``_module.`` prefix, so `dpseg predict`
needs no engine), the optimizer state (for a DP optimizer this includes the noise step
counter and seed), the privacy ledger (the accountant's history: a resumed run keeps
spending from it, epsilon never resets), the RNG states, the step, the curves so far and the
run's configuration.

It is written to a temporary file in the same folder, flushed to disk and renamed over the
old one (``os.replace`` is atomic on POSIX and Windows), so a run killed at any moment leaves
either the previous checkpoint or the new one, never a torn file. Only plain containers,
numbers, strings and tensors go in, so it loads with ``torch.load(weights_only=True)``: a
checkpoint from elsewhere cannot run code on load.
"""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dpseg.data import DataError

__all__ = [
    "CHECKPOINT_FORMAT",
    "save_checkpoint",
    "load_checkpoint",
    "rng_state",
    "set_rng_state",
]

CHECKPOINT_FORMAT = "dpseg-checkpoint-1"


def rng_state() -> dict[str, Any]:
    """The global RNG states (torch CPU/CUDA, numpy, python), as weights_only-safe values."""
    np_state = np.random.get_state(legacy=False)  # noqa: NPY002 (the global state is the point)
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": {
            "bit_generator": np_state["bit_generator"],
            "key": torch.as_tensor(np.asarray(np_state["state"]["key"], dtype=np.int64)),
            "pos": int(np_state["state"]["pos"]),
            "has_gauss": int(np_state["has_gauss"]),
            "cached_gaussian": float(np_state["gauss"]),
        },
        "python": _python_state_to_list(random.getstate()),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _python_state_to_list(state: tuple) -> list:
    version, internal, gauss = state
    return [version, list(internal), gauss]


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(  # noqa: NPY002
        {
            "bit_generator": n["bit_generator"],
            "state": {"key": n["key"].numpy().astype(np.uint32), "pos": n["pos"]},
            "has_gauss": n["has_gauss"],
            "gauss": n["cached_gaussian"],
        }
    )
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> Path:
    """Write `state` (a dict of plain values and tensors) atomically to `path`.

    Adds the format tag and the global RNG states. Raises DataError naming the folder when
    it cannot be written; the previous checkpoint, if any, is then left untouched.
    """
    path = Path(path)
    payload = {"format": CHECKPOINT_FORMAT, "rng": rng_state(), **state}
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:
            pass
        raise DataError(
            f"{path}: the checkpoint cannot be written ({exc.strerror or exc}). Free disk "
            "space or choose a writable --out folder; the previous checkpoint is unchanged."
        ) from exc
    return path


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint written by `save_checkpoint`; DataError names the file if it is
    missing, unreadable or not a dpseg checkpoint. Does not restore the RNG states (call
    `set_rng_state(ckpt["rng"])` for that)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(
            f"{path}: checkpoint not found. Pass the checkpoint.pt of a finished or "
            "interrupted `dpseg train` run (RUN/checkpoint.pt)."
        )
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # truncated zip, pickle of foreign objects, wrong file
        raise DataError(
            f"{path}: not a readable dpseg checkpoint ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else ''}). It may be truncated or come "
            "from another program; use the RUN/checkpoint.pt that `dpseg train` wrote."
        ) from exc
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise DataError(
            f"{path}: not a dpseg checkpoint (no {CHECKPOINT_FORMAT!r} format tag). Use the "
            "RUN/checkpoint.pt that `dpseg train` wrote."
        )
    return ckpt
