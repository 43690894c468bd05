"""The cost of SecAgg+ per round, beside the plain round for the same sites.

Two measurements on the same three sites, model, data and seed:

- loopback: ``dpseg federate --runtime flower`` on this machine, plain and ``--secagg``,
  through real Flower processes. Per round: the wall seconds of the training exchange and
  aggregation (``seconds``), and the bytes the server sent and received in it
  (``train_bytes``: Flower's serialised objects of each message's content, counted by
  dpseg.federated.flower.traffic).
- in-process: the same ClientApp, ServerApp and SecAgg+ code with the transport replaced
  (tests/flower_harness.py), one site after another: what the protocol itself costs
  (keys, shares, masking, unmasking), without Flower starting a process per message.

Writes OUT/results.json and prints the table of README.md. Usage (from the repository):

    .venv/bin/python docs/results/secagg_cost/measure.py runs/secagg_cost
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(ROOT / "tests"))

from dpseg.federated.flower.deploy import run_flower_deployment  # noqa: E402
from dpseg.federated.runner import FederatedConfig  # noqa: E402
from dpseg.perf.harness import environment  # noqa: E402

# Three sites of 12 phantoms (9 train, 3 held out) at 24^3, the default 3-D U-Net widths
# (8, 16, 32): 80,866 parameters; 2 DP steps a round, as cheap as a round can be, so that
# the protocol's overhead shows.
SETTINGS = dict(
    phantoms=36, sites=3, size=24, patch=16, channels=(8, 16, 32), local_steps=2,
    batch_size=4, accountant="rdp", rounds=3, seed=0,
)  # fmt: skip


def _rounds(report: dict) -> list[dict]:
    return [
        {
            "round": r["round"],
            "seconds": r["seconds"],
            "sent": r["train_bytes"]["sent"],
            "received": r["train_bytes"]["received"],
            **({"protocol_seconds": r["secagg"]["seconds"]} if "secagg" in r else {}),
        }
        for r in report["rounds"]
    ]


def loopback(out: Path, secure: bool) -> list[dict]:
    cfg = FederatedConfig(**SETTINGS, secagg=secure)
    report = run_flower_deployment(cfg, out, plots=False, threads=1, timeout=3600,
                                   echo=lambda s: None)  # fmt: skip
    return _rounds(report)


def in_process(out: Path, secure: bool) -> list[dict]:
    from flower_harness import Federation

    fed = Federation(FederatedConfig(**SETTINGS, secagg=secure), out)
    torch.set_num_threads(1)
    return [fed.round() for _ in range(SETTINGS["rounds"])]


def _median(rows: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in rows)


def main(out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    result: dict = {"settings": SETTINGS, "environment": environment("cpu")}
    result["environment"]["load_average_at_start"] = list(os.getloadavg())
    for kind in ("plain", "secagg"):
        start = time.perf_counter()
        result[f"loopback_{kind}"] = loopback(out / f"loopback_{kind}", kind == "secagg")
        print(f"loopback {kind}: {time.perf_counter() - start:.0f} s", flush=True)
    for kind in ("plain", "secagg"):
        rows = _rounds({"rounds": in_process(out / f"inprocess_{kind}", kind == "secagg")})
        result[f"in_process_{kind}"] = rows
    from dpseg.federated.flower.config import model_fn

    model = model_fn(FederatedConfig(**SETTINGS), 2)()
    result["parameters"] = sum(p.numel() for p in model.parameters())
    result["config"] = asdict(FederatedConfig(**SETTINGS))
    (out / "results.json").write_text(json.dumps(result, indent=1))
    print(table(result))


def table(result: dict) -> str:
    lines = [
        "| where | aggregation | s / round (median) | x plain | bytes sent / round | "
        "bytes received / round | x plain (received) |",
        "|---|---|---|---|---|---|---|",
    ]
    for where in ("loopback", "in_process"):
        plain = result[f"{where}_plain"]
        for kind in ("plain", "secagg"):
            rows = result[f"{where}_{kind}"]
            s, sent, got = (_median(rows, k) for k in ("seconds", "sent", "received"))
            lines.append(
                f"| {where.replace('_', '-')} | {'SecAgg+' if kind == 'secagg' else 'plain'} | "
                f"{s:.1f} | {s / _median(plain, 'seconds'):.2f} | {sent:,.0f} | {got:,.0f} | "
                f"{got / _median(plain, 'received'):.2f} |"
            )
    return "\n".join(lines)


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "runs/secagg_cost"))
