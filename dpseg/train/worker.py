"""The entry point of one `dpseg train --nproc N` worker (started by torchrun from
dpseg.train.distributed.launch): joins the process group and runs `run_training`."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from dpseg.train.config import TrainConfig
from dpseg.train.distributed import rank
from dpseg.train.run import run_training


def _worker(spec_path: str) -> int:
    spec = json.loads(Path(spec_path).read_text())
    cfg = TrainConfig.from_dict(spec["config"])
    overrides = spec["overrides"] or None
    if overrides and "channels" in overrides:
        overrides["channels"] = tuple(overrides["channels"])
    device = (overrides or {}).get("device", cfg.device)
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if device == "cuda":
        torch.cuda.set_device(local_rank)
    torch.set_num_threads(int(os.environ.get("DPSEG_THREADS", "1")))
    dist.init_process_group("nccl" if device == "cuda" else "gloo")
    try:
        run_training(
            cfg,
            resume=spec["resume"],
            overrides=overrides,
            progress=spec["progress"] and rank() == 0,
        )
    finally:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(_worker(sys.argv[1]))
