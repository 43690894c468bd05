"""Kernel-level GPU figures for the fused DP ops, beside their baselines, in one process.

    python bench/gpu_kernels.py --device cuda --out bench/results      (the GPU session)
    python bench/gpu_kernels.py --device cpu --quick                    (code path check)

1. Copy bandwidth: a device-to-device copy of a 1 GiB buffer (read + write bytes / time),
   the yardstick of the "fused clip/noise pass >= 80% of copy bandwidth" target.
2. The clip/noise pass per backend on the parameters of the benchmark U-Net (channels
   32-64-128-256, ~5.6M parameters) at batch 2 and 4: time, effective bandwidth
   (B*P reads + P writes) and its fraction of the copy bandwidth; the norms pass likewise.
3. Per-sample conv weight gradients per strategy (loop / grouped cuDNN, Triton) on the
   U-Net's layer shapes at 128^3 (32^3 with --quick), batch 2.
Writes OUT/gpu_kernels_<device>.json and appends to OUT/history.jsonl, with the environment
(device, torch/triton versions, commit).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dpseg import ops  # noqa: E402
from dpseg.models.unet import UNet  # noqa: E402
from dpseg.perf.harness import append_result, environment, time_call  # noqa: E402
from dpseg.privacy.rules import conv_weight_grad as cwg  # noqa: E402


def copy_bandwidth(device, nbytes: int, repeats: int) -> dict:
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    t = time_call(lambda: dst.copy_(src), repeats=repeats, warmup=2, device=device)
    return {"bytes": nbytes, "median_s": t.median_s, "gbps": 2 * nbytes / t.median_s / 1e9}


def unet_param_shapes(channels) -> list[torch.Size]:
    model = UNet(spatial_dims=3, in_channels=1, out_channels=2, channels=channels)
    return [p.shape for p in model.parameters()]


def fused_pass(device, shapes, batch, backends, repeats, copy_gbps) -> list[dict]:
    g = torch.Generator(device=device).manual_seed(batch)
    grads = [torch.randn((batch, *s), generator=g, device=device) for s in shapes]
    c = torch.rand(batch, dtype=torch.float64, device=device)
    numel = sum(s.numel() for s in shapes)
    rows = []
    for backend in backends:
        for name, fn, nbytes in (
            (
                "clip_accumulate_noise",
                lambda b=backend: ops.clip_accumulate_noise(
                    grads, c, 1.0, 1 / batch, 7, 1, backend=b
                ),  # fmt: skip
                (batch + 1) * numel * 4,
            ),
            (
                "per_sample_sq_norms",
                lambda b=backend: ops.per_sample_sq_norms(grads, backend=b),
                batch * numel * 4,
            ),
        ):
            try:
                t = time_call(fn, repeats=repeats, warmup=2, device=device)
            except Exception as err:  # a backend that cannot run here: recorded, not fatal
                rows.append({"op": name, "backend": backend, "batch": batch, "error": repr(err)})
                continue
            gbps = nbytes / t.median_s / 1e9
            rows.append({
                "op": name, "backend": backend, "batch": batch, "numel": numel,
                "median_s": t.median_s, "p20_s": t.p20_s, "p80_s": t.p80_s, "gbps": gbps,
                "of_copy": gbps / copy_gbps if copy_gbps else None,
            })  # fmt: skip
    return rows


def conv_layers(channels, size):
    """(cin, cout, spatial, transposed) of the U-Net's 3x3x3 convs and 2x2x2 up-convs."""
    layers, cin = [], 1
    for level, c in enumerate(channels):
        s = size >> level
        layers += [(cin, c, s, False), (c, c, s, False)]
        cin = c
    for level in range(len(channels) - 1, 0, -1):
        layers.append((channels[level], channels[level - 1], size >> level, True))
    return layers


def _timed_ms(fn, repeats, device) -> float:
    return time_call(fn, repeats=repeats, warmup=1, device=device).median_s * 1e3


def conv_strategies(device, channels, size, batch, repeats) -> list[dict]:
    rows = []
    strategies = ["loop", "grouped"]
    if device.type == "cuda" and "triton" in ops.BACKENDS:
        strategies.append("triton")
    for cin, cout, s, transposed in conv_layers(channels, size):
        x = torch.randn(batch, cin, s, s, s, device=device)
        if transposed:
            w = torch.randn(cin, cout, 2, 2, 2, device=device)
            geometry = ([2] * 3, [0] * 3, [1] * 3, True, [0] * 3, 1)
        else:
            w = torch.randn(cout, cin, 3, 3, 3, device=device)
            geometry = ([1] * 3, [1] * 3, [1] * 3, False, [0] * 3, 1)
        go = torch.randn_like(torch.ops.aten.convolution(x, w, None, *geometry))
        row = {"layer": f"{'up' if transposed else 'conv'} {cin}->{cout} @ {s}^3", "batch": batch}
        args = (go, x, w, *geometry)
        for strategy in strategies:
            row[f"{strategy}_ms"] = _timed_ms(
                lambda st=strategy, a=args: cwg.per_sample_conv_weight_grad(*a, strategy=st),
                repeats,
                device,
            )
        row["non_private_ms"] = _timed_ms(
            lambda a=args: torch.ops.aten.convolution_backward(
                a[0], a[1], a[2], None, *a[3:], [False, True, False]
            ),
            repeats,
            device,
        )
        rows.append(row)
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda", choices=["cpu", "cuda"])
    p.add_argument("--quick", action="store_true", help="small sizes: checks the code paths")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda but torch sees no CUDA device")
    channels = (8, 16) if args.quick else (32, 64, 128, 256)
    size = 16 if args.quick else 128
    repeats = 2 if args.quick else args.repeats
    backends = [b for b in ops.available_backends() if ops.BACKENDS[b].runs_on(device)]
    if args.quick and device.type == "cpu":
        backends = [b for b in backends if b != "triton"]  # interpreter timings mean nothing
    copy = copy_bandwidth(device, (64 if args.quick else 1024) << 20, repeats)
    print(f"copy bandwidth: {copy['gbps']:.1f} GB/s", flush=True)
    shapes = unet_param_shapes(channels)
    fused = []
    for batch in (2, 4):
        fused += fused_pass(device, shapes, batch, backends, repeats, copy["gbps"])
    for r in fused:
        if "error" in r:
            print(f"{r['op']:>22} {r['backend']:>7} B={r['batch']}: {r['error']}")
        else:
            print(f"{r['op']:>22} {r['backend']:>7} B={r['batch']}: {r['median_s'] * 1e3:8.3f} ms "
                  f"{r['gbps']:7.1f} GB/s ({100 * r['of_copy']:.0f}% of copy)")  # fmt: skip
    conv = conv_strategies(device, channels, size, 2, repeats)
    for r in conv:
        times = "  ".join(f"{k[:-3]} {v:8.2f} ms" for k, v in r.items() if k.endswith("_ms"))
        print(f"{r['layer']:>24}: {times}")
    record = {"environment": environment(device), "copy": copy, "fused": fused, "conv": conv,
              "config": {"channels": channels, "size": size, "quick": args.quick}}  # fmt: skip
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"gpu_kernels_{device.type}.json").write_text(json.dumps(record, indent=2))
    append_result(args.out / "history.jsonl", record)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
