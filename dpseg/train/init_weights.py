"""`dpseg train --init CKPT`: start the model from weights trained elsewhere (public
pretraining), never from weights that saw this run's patients.

DP's guarantee covers what the run's own steps release. Weights it starts from are outside
that ledger: they are as private as the data they were trained on. Pretraining on public data
disjoint from the patients (phantoms, another public collection) costs no epsilon; starting from
a model trained on the same patients (a non-private run, say) would publish them through the
initialisation, whatever the epsilon says. So:

- a dpseg checkpoint (`dpseg train`'s, or `dpseg federate`'s global model) records the data and
  the cases it trained on, and, when it started from --init itself, that source's record: the
  whole lineage is checked, so weights cannot be laundered through an intermediate run. If any
  case of the lineage shares its name with a case of this run's data, or its data folder is this
  run's, the init is refused;
- a bare state_dict carries no record: it is accepted, and the report says the epsilon holds
  only if those weights saw none of these cases;
- what was loaded is recorded in the report and the checkpoint (the file's SHA-256, the
  lineage's data folders, cases and ledgers), so the starting point's provenance travels with
  the model, and on to any run that starts from it.

Tensors are loaded by name where the shapes agree (a ``module.`` or ``_module.`` prefix from DDP
or Opacus dropped); the others (an output layer for another number of classes) keep their fresh
initialisation and are listed.
"""

from __future__ import annotations

import hashlib
import io
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dpseg.data import DataError

_PREFIXES = ("module.", "_module.")


def _resolved(data: str | None) -> str | None:
    if not data:
        return None
    try:
        return str(Path(data).resolve())
    except OSError:
        return str(data)


def _dataset_cases(data: str) -> list[str]:
    from dpseg.data import MSDDataset

    return [c.name for c in MSDDataset(data).cases]


def _federated_source(payload: dict, path: Path) -> dict[str, Any]:
    cfg = (payload.get("extra") or {}).get("config") or {}
    data = cfg.get("data")
    if not data:  # trained on phantoms the run generated: no patient
        return {"data": None, "cases": [], "dp": None, "ledger": None, "known": True}
    try:
        if cfg.get("split"):
            from dpseg.train.splits import read_case_list

            cases = list(read_case_list(cfg["split"]))
        else:  # a federation partitions every case of its folder
            cases = _dataset_cases(data)
    except (DataError, OSError) as exc:
        raise DataError(
            f"--init {path}: a federated model of {data}, whose cases cannot be read here "
            f"({exc}); without them it cannot be checked against --data. Run from where its "
            "data folder and split file are reachable."
        ) from None
    return {"data": _resolved(data), "cases": sorted(cases), "dp": None, "ledger": None,
            "known": True}  # fmt: skip


def _source(payload: Any, path: Path) -> tuple[dict[str, torch.Tensor], dict, list[dict]]:
    """(the weights, the source's own record, the records of the sources it started from)."""
    if isinstance(payload, dict) and "federated" in payload:
        weights = payload.get("weights")
        if not isinstance(weights, dict) or not weights:
            raise DataError(f"--init {path}: a federated checkpoint without global weights")
        return weights, _federated_source(payload, path), []
    if isinstance(payload, dict) and isinstance(payload.get("model"), dict):
        config = payload.get("config") or {}
        split = payload.get("split") or {}
        ledger = (payload.get("privacy") or {}).get("ledger")
        own = {
            "data": _resolved(config.get("data")),
            "cases": sorted({*split.get("train", []), *split.get("val", [])}),
            "dp": bool(config.get("dp", False)),
            "ledger": ledger,
            "known": True,
        }
        earlier = payload.get("init") or {}
        return payload["model"], own, list(earlier.get("lineage", []))
    if (
        isinstance(payload, dict)
        and payload
        and all(isinstance(v, torch.Tensor) for v in payload.values())
    ):
        return payload, {"data": None, "cases": [], "dp": None, "ledger": None, "known": False}, []
    raise DataError(
        f"{path}: --init takes a dpseg checkpoint (dpseg train's checkpoint.pt, dpseg federate's "
        "checkpoint_<engine>.pt) or a state_dict saved with torch.save(model.state_dict(), "
        "PATH); this file is none of them."
    )


def read_init(init: str, data: str, cases: list[str]) -> tuple[dict[str, torch.Tensor], dict]:
    """Reads ``init`` and checks its lineage against this run's ``data`` folder and its
    ``cases`` (every case name of that folder); returns (weights, record). Raises DataError
    when the weights saw any of them."""
    path = Path(init)
    if not path.is_file():
        raise DataError(f"--init {init}: no such file")
    raw = path.read_bytes()  # hashed and loaded from the same bytes
    try:
        payload = torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)
    except Exception as exc:  # a pickle with code in it, a truncated file
        first = str(exc).splitlines()[0] if str(exc) else ""
        raise DataError(
            f"--init {init}: cannot be read as saved tensors ({type(exc).__name__}: {first}). "
            "Save the weights with torch.save(model.state_dict(), PATH)."
        ) from None
    weights, own, earlier = _source(payload, path)
    lineage = [{**own, "file": str(path)}, *earlier]
    ours, here = set(cases), _resolved(data)
    for source in lineage:
        shared = sorted(set(source["cases"]) & ours)
        if shared:
            raise DataError(
                f"--init {init} was trained{_via(source, path)} on {len(shared)} case(s) named "
                f"as in --data ({', '.join(shared[:3])}{', ...' if len(shared) > 3 else ''}). "
                "Weights that saw these patients publish them through the initialisation, "
                "outside this run's epsilon. Start from a model trained on data disjoint from "
                "--data (public data, phantoms), or from scratch; if they are other patients "
                "whose cases share names, rename one collection's cases."
            )
        if source["data"] and source["data"] == here:
            raise DataError(
                f"--init {init} was trained{_via(source, path)} on this run's data folder "
                f"{data}: weights that saw its patients publish them outside this run's "
                "epsilon. Start from a model trained on disjoint (public) data, or from scratch."
            )
    known = [s["known"] for s in lineage]
    record = {
        "path": str(path),
        "sha256": hashlib.sha256(raw).hexdigest(),
        "source_data": own["data"],
        "source_cases": len(own["cases"]),
        "source_dp": own["dp"],
        "source_ledger": own["ledger"],
        "lineage": lineage,
        "provenance": "recorded" if all(known) else "not recorded" if not any(known)
        else "partly not recorded",
    }  # fmt: skip
    return weights, record


def _via(source: dict, path: Path) -> str:
    return "" if source.get("file") == str(path) else f" (through {source.get('file')})"


def apply_init(model: nn.Module, weights: dict[str, torch.Tensor], record: dict) -> dict:
    """Copies ``weights`` into ``model`` where names (prefixes dropped) and shapes agree;
    returns ``record`` with what was loaded and what kept its fresh initialisation."""
    named = {}
    for name, value in weights.items():
        for prefix in _PREFIXES:
            if name.startswith(prefix):
                name = name[len(prefix) :]
        named[name] = value
    own = model.state_dict()
    loaded, kept = [], []
    with torch.no_grad():
        for name, value in own.items():
            src = named.get(name)
            if src is not None and tuple(src.shape) == tuple(value.shape):
                value.copy_(src.to(value.dtype))
                loaded.append(name)
            else:
                kept.append(name)
    if not any(own[n].dim() > 1 for n in loaded):  # biases and norms alone are not a model
        raise DataError(
            f"--init {record['path']}: none of its weight tensors matches this model's by name "
            f"and shape (it has {len(named)} tensors, e.g. {next(iter(named), '-')}; the model "
            f"{len(own)}, e.g. {next(iter(own), '-')}). Train the source with the same "
            "--channels, --norm, --upsample and --spatial-dims."
        )
    return {**record, "loaded": len(loaded), "kept_fresh": kept}
