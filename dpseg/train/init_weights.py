"""`dpseg train --init CKPT`: start the model from weights trained elsewhere (public
pretraining), never from weights that saw this run's patients.

DP's guarantee covers what the run's own steps release. Weights it starts from are outside
that ledger: they are as private as the data they were trained on. Pretraining on public data
disjoint from the patients (phantoms, another public collection) costs no epsilon; starting from
a model trained on the same patients (a non-private run, say) would publish them through the
initialisation, whatever the epsilon says. So:

- a dpseg checkpoint records the data and the cases it trained on; if any of them is one of
  this run's cases, or its data folder is this run's, the init is refused;
- a bare state_dict carries no record: it is accepted, and the report says the epsilon holds
  only if those weights saw none of these cases;
- what was loaded is recorded in the report and the checkpoint (file, SHA-256, the source's
  data, cases and epsilon), so the provenance of the starting point travels with the model.

Parameters and buffers are loaded by name where the shapes agree; the others (an output layer
for another number of classes) keep their fresh initialisation and are listed.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dpseg.data import DataError


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _same_folder(a: str, b: str) -> bool:
    try:
        return Path(a).resolve() == Path(b).resolve()
    except OSError:
        return a == b


def _source(payload: Any, path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(the weights, what the file says of where they came from)."""
    if isinstance(payload, dict) and isinstance(payload.get("model"), dict):
        config = payload.get("config") or {}
        split = payload.get("split") or {}
        ledger = (payload.get("privacy") or {}).get("ledger")
        cases = sorted({*split.get("train", []), *split.get("val", [])})
        return payload["model"], {
            "data": config.get("data"),
            "cases": cases,
            "dp": bool(config.get("dp", False)),
            "ledger": ledger,
        }
    if (
        isinstance(payload, dict)
        and payload
        and all(isinstance(v, torch.Tensor) for v in payload.values())
    ):
        return payload, {"data": None, "cases": [], "dp": None, "ledger": None}
    raise DataError(
        f"{path}: --init takes a dpseg checkpoint (dpseg train's checkpoint.pt) or a "
        "state_dict saved with torch.save(model.state_dict(), PATH); this file is neither."
    )


def load_init(model: nn.Module, init: str, data: str, cases: list[str]) -> dict[str, Any]:
    """Loads ``init``'s weights into ``model`` where names and shapes agree and returns the
    record for the report; refuses weights trained on ``data`` or on any of ``cases``."""
    path = Path(init)
    if not path.is_file():
        raise DataError(f"--init {init}: no such file")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a pickle with code in it, a truncated file
        raise DataError(
            f"--init {init}: cannot be read as saved tensors ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else ''}). Save the weights with "
            "torch.save(model.state_dict(), PATH)."
        ) from None
    weights, source = _source(payload, path)
    shared = sorted(set(source["cases"]) & set(cases))
    if shared or (source["data"] and _same_folder(source["data"], data)):
        which = (
            f"{len(shared)} of this run's cases ({', '.join(shared[:3])}"
            f"{', ...' if len(shared) > 3 else ''})"
            if shared
            else f"this run's data folder {data}"
        )
        raise DataError(
            f"--init {init} was trained on {which}. Weights that saw these patients publish "
            "them through the initialisation, outside this run's epsilon. Start from a model "
            "trained on data disjoint from --data (public data, phantoms), or from scratch."
        )
    own = model.state_dict()
    loaded, kept = [], []
    with torch.no_grad():
        for name, value in own.items():
            src = weights.get(name)
            if src is not None and tuple(src.shape) == tuple(value.shape):
                value.copy_(src.to(value.dtype))
                loaded.append(name)
            else:
                kept.append(name)
    if not any(isinstance(own[n], torch.Tensor) and own[n].is_floating_point() for n in loaded):
        raise DataError(
            f"--init {init}: none of its tensors matches this model's by name and shape "
            f"(the model has {len(own)}, e.g. {next(iter(own), '-')}); train the source "
            "with the same --channels, --norm and --upsample."
        )
    ledger = source["ledger"]
    return {
        "path": str(path),
        "sha256": _sha256(path),
        "loaded": len(loaded),
        "kept_fresh": kept,
        "source_data": source["data"],
        "source_cases": len(source["cases"]),
        "source_dp": source["dp"],
        "source_ledger": ledger,
        "provenance": "recorded" if source["data"] or source["cases"] else "not recorded",
    }
