"""`dpseg profile`: where the DP step's extra time goes, as a table and a Chrome trace.

The engine marks its work with record_function ranges (visible in torch.profiler traces,
and as NVTX ranges under nsys with --nvtx): ``dpseg::backward[Layer]`` (a captured layer's
whole backward: input gradient plus per-sample gradients), inside it
``dpseg::per_sample_weight_grad[strategy]``, then ``dpseg::per_sample_norms``,
``dpseg::clip_accumulate_noise`` and ``dpseg::optimizer_update``. The same step is profiled
without DP; the difference of the two step times is the DP overhead the table splits up.
``profile_dp_step`` profiles dpseg's benchmark U-Net, ``profile_step`` the user's own network
(``dpseg profile --model PACKAGE.MODULE:CALLABLE``).
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import torch
from torch.autograd.profiler import record_function
from torch.profiler import ProfilerActivity, profile

from dpseg.perf.allocator import freed_memory_policy
from dpseg.perf.dp_step import StepBenchConfig, build_workload, make_step
from dpseg.perf.harness import huge_pages


def _range_times_ms(prof, steps: int) -> dict[str, float]:
    """Wall time per step of every ``dpseg::``/``step[`` range (CPU-side, and device time
    for CUDA kernels launched inside it is in the trace)."""
    totals: dict[str, float] = defaultdict(float)
    for event in prof.events():
        if event.name.startswith(("dpseg::", "step[")):
            totals[event.name] += event.time_range.elapsed_us() / 1e3
    return {name: t / steps for name, t in totals.items()}


def profile_dp_step(cfg: StepBenchConfig, out: Path, steps: int = 2, nvtx: bool = False) -> dict:
    """The benchmark U-Net of ``cfg`` (channels, size, batch, device, backend)."""
    model, x, y = build_workload(cfg)
    config = {
        "channels": cfg.channels,
        "size": cfg.size,
        "spatial_dims": cfg.spatial_dims,
        "batch": cfg.batch,
        "device": cfg.device,
        "steps": steps,
    }
    return _profile(model, x, y, cfg, None, out, steps, nvtx, config)


def profile_step(
    model: torch.nn.Module,
    example_input: torch.Tensor,
    example_target: torch.Tensor,
    out: Path,
    *,
    loss_fn=None,
    steps: int = 2,
    nvtx: bool = False,
    backend: str = "auto",
    name: str | None = None,
) -> dict:
    """The user's own network (``dpseg profile --model``), as ``bench_step`` benches it: a
    training step on ``example_input`` (leading dimension the batch) and ``example_target``
    with ``loss_fn(output, target)`` (default cross-entropy), without DP and with dpseg, each
    on its own copy of the model."""
    cfg = StepBenchConfig(
        size=int(example_input.shape[-1]),
        batch=int(example_input.shape[0]),
        device=str(example_input.device.type),
        backend=backend,
        channels=(),
    )
    config = {
        "model": name or type(model).__name__,
        "parameters": sum(p.numel() for p in model.parameters()),
        "input_shape": list(example_input.shape),
        "batch": cfg.batch,
        "device": cfg.device,
        "steps": steps,
    }
    return _profile(model, example_input, example_target, cfg, loss_fn, out, steps, nvtx, config)


def _profile(model, x, y, cfg, loss_fn, out, steps: int, nvtx: bool, config: dict) -> dict:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device(cfg.device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    result = {"config": config, "engines": {}}
    if device.type == "cpu":
        result["huge_pages"] = huge_pages()
        result["freed_memory"] = freed_memory_policy()
    for engine in ("none", "dpseg"):
        step = make_step(engine, model, x, y, cfg, loss_fn)
        for _ in range(2):  # warm-up: oneDNN primitives, conv strategy choice, cuDNN autotune
            step()
        with profile(activities=activities) as prof:
            for _ in range(steps):
                with record_function(f"step[{engine}]"):
                    if nvtx and device.type == "cuda":
                        with torch.autograd.profiler.emit_nvtx():
                            step()
                    else:
                        step()
                if device.type == "cuda":
                    torch.cuda.synchronize()
        trace = out / f"trace_{engine}.json"
        prof.export_chrome_trace(str(trace))
        result["engines"][engine] = {"trace": str(trace), "ranges_ms": _range_times_ms(prof, steps)}
    none_ms = result["engines"]["none"]["ranges_ms"]["step[none]"]
    dp_ms = result["engines"]["dpseg"]["ranges_ms"]["step[dpseg]"]
    result["step_ms"] = {"none": none_ms, "dpseg": dp_ms, "extra": dp_ms - none_ms}
    return result


def format_profile(result: dict) -> str:
    cfg, step = result["config"], result["step_ms"]
    ranges = result["engines"]["dpseg"]["ranges_ms"]
    if cfg.get("model"):
        what = f"{cfg['model']} ({cfg['parameters']:,} params), input {tuple(cfg['input_shape'])}"
    else:
        what = (
            f"UNet{tuple(cfg['channels'])}, {cfg['size']}^{cfg.get('spatial_dims', 3)}, "
            f"batch {cfg['batch']}"
        )
    lines = [
        f"DP step profile: {what}, {cfg['device']}, mean of {cfg['steps']} steps",
        f"  non-private step  {step['none']:9.1f} ms",
        f"  dpseg step        {step['dpseg']:9.1f} ms   extra {step['extra']:+.1f} ms "
        f"({step['dpseg'] / step['none']:.2f}x)",
        "  inside the dpseg step (a layer's backward includes its per-sample weight grads):",
    ]
    for name in sorted(ranges, key=ranges.get, reverse=True):
        if name.startswith("dpseg::"):
            lines.append(f"    {name:<46}{ranges[name]:9.1f} ms")
    if result.get("huge_pages"):  # moves CPU steps (docs/results/floor26/spread9)
        lines.append(f"  huge pages: {result['huge_pages']}")
    if result.get("freed_memory"):  # so does glibc's trimming (dpseg.perf.allocator)
        lines.append(f"  freed memory: {result['freed_memory']}")
    lines.append("  traces (open in chrome://tracing or ui.perfetto.dev):")
    lines += [f"    {e['trace']}" for e in result["engines"].values()]
    return "\n".join(lines)
