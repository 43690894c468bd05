"""The workload every script here times: SegResNet (init 16) at 48^3, batch 2, CPU, built as
`dpseg bench --model` builds it, and the interleaved timing its rounds use."""

from __future__ import annotations

import statistics
import time

import torch

from dpseg.perf.dp_step import StepBenchConfig, make_step
from dpseg.perf.user_model import example_batch, load_model

KWARGS = {"spatial_dims": 3, "in_channels": 1, "out_channels": 2, "init_filters": 16}
ENGINES = ("none", "dpseg")


def warm_steps(engines=ENGINES, warmup: int = 3) -> dict:
    """engine -> its training step on a private copy of the model, warmed up."""
    torch.manual_seed(0)
    model = load_model("monai.networks.nets:SegResNet", KWARGS)
    x, y = example_batch(model, batch=2, size=48)
    cfg = StepBenchConfig(batch=2, size=48)
    steps = {e: make_step(e, model, x, y, cfg) for e in engines}
    for step in steps.values():
        for _ in range(warmup):
            step()
    return steps


def interleaved_medians(steps: dict, rounds: int, per_round: int = 2) -> dict:
    """engine -> median ms a step over ``rounds`` rounds, each running every engine's step
    ``per_round`` times in turn."""
    times = {e: [] for e in steps}
    for _ in range(rounds):
        for e, step in steps.items():
            t0 = time.perf_counter()
            for _ in range(per_round):
                step()
            times[e].append((time.perf_counter() - t0) / per_round)
    return {e: 1e3 * statistics.median(t) for e, t in times.items()}
