"""`dpseg train --nproc N`: one site's training on N processes through torch.distributed.

The launcher writes the run's settings to RUN/.launch.json and starts N workers with
torchrun (``python -m torch.distributed.run --standalone``), each pinned to a fixed number of
threads (OMP_NUM_THREADS and torch.set_num_threads: by default the machine's cores shared
evenly). Each worker joins the process group (gloo on CPU, NCCL on CUDA, one GPU per local
rank) and runs the same `run_training`: the model is wrapped in DistributedDataParallel
before make_private, so the engine's distributed DP step applies (dpseg.privacy.distributed).
Rank 0 alone holds the run lock, evaluates, and writes checkpoints and reports; a resumed
run continues from rank 0's checkpoint on every rank, with its privacy ledger.

This module is what `run_training` needs of the process group; the workers' entry point,
which calls `run_training`, is dpseg.train.worker (so neither imports the other's importer).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

LAUNCH_FILE = ".launch.json"


def threads_per_process(nproc: int, threads: int | None) -> int:
    return threads if threads else max(1, (os.cpu_count() or 1) // nproc)


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def launch(cfg, resume: bool, overrides: dict | None, progress: bool, nproc: int) -> dict:
    """Runs the workers; returns rank 0's report."""
    from dpseg.data import DataError

    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    spec = {
        "config": cfg.as_dict(),
        "resume": resume,
        "overrides": {
            k: list(v) if isinstance(v, tuple) else v for k, v in (overrides or {}).items()
        },
        "progress": progress,
    }
    (out / LAUNCH_FILE).write_text(json.dumps(spec))
    threads = threads_per_process(nproc, (overrides or {}).get("threads", cfg.threads))
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "DPSEG_THREADS": str(threads)}
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone",
        f"--nproc-per-node={nproc}", "-m", "dpseg.train.worker", str(out / LAUNCH_FILE),
    ]  # fmt: skip
    done = subprocess.run(cmd, env=env)
    if done.returncode != 0:
        raise DataError(
            f"the {nproc} training processes failed (exit code {done.returncode}); their "
            "errors are printed above. Nothing after the last checkpoint was kept."
        )
    return json.loads((out / "report.json").read_text())


def wrap_for_ranks(model: torch.nn.Module, device: torch.device) -> Any:
    """DDP around the model when this process is one of several, else the model."""
    if world_size() == 1:
        return model
    from torch.nn.parallel import DistributedDataParallel

    if device.type == "cuda":
        return DistributedDataParallel(model, device_ids=[device.index])
    return DistributedDataParallel(model)
