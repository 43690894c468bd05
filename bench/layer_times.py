"""Where a DP step's extra time goes, layer by layer, inside the real step.

Times every conv, norm and PReLU node of the backward pass, non-private against dpseg, in
one process with the engines interleaved step by step: a hook on each layer's autograd node
(pre-hook to post-hook) records its time; the median over steps is reported per layer and
per layer type, with the forward, backward and optimizer phases. Microbenchmarks of one
layer miss what the step does to it (cache state, which algorithm oneDNN picks in place):
this is how MONAI UNet's last 2->2 conv was found to cost 22 ms non-private (oneDNN's
backward-data floor) and SegResNet's per-sample GroupNorm +0.7 ms a layer in cache.

    .venv/bin/python bench/layer_times.py --model monai.networks.nets:SegResNet \\
        --model-kwargs '{"spatial_dims": 3, "in_channels": 1, "out_channels": 2}' --size 48

Set GLIBC_TUNABLES=glibc.malloc.trim_threshold=4294967296:glibc.malloc.mmap_threshold=4294967295
to time without the page faults of fresh buffers (both engines pay them).
"""

from __future__ import annotations

import argparse
import collections
import copy
import time
import warnings

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import dpseg
from dpseg.perf.user_model import example_batch, load_model, parse_model_kwargs

TIMED = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d,
         nn.ConvTranspose3d, nn.GroupNorm, nn.InstanceNorm3d, nn.LayerNorm, nn.PReLU)  # fmt: skip


def build(engine: str, model0: nn.Module, x, y):
    model = copy.deepcopy(model0)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    times: dict[str, float] = collections.defaultdict(float)

    def hook(module, inputs, out):
        if not torch.is_grad_enabled() or getattr(out, "grad_fn", None) is None:
            return
        start: list[float] = []
        out.grad_fn.register_prehook(lambda g: start.append(time.perf_counter()))
        out.grad_fn.register_hook(
            lambda gi, go: times.__setitem__(
                module._timed_as, times[module._timed_as] + time.perf_counter() - start[-1]
            )
        )

    for name, module in model.named_modules():
        if isinstance(module, TIMED):
            module._timed_as = f"{type(module).__name__}:{name}"
            module.register_forward_hook(hook)
    if engine == "dpseg":
        loader = torch.utils.data.DataLoader(
            torch.utils.data.TensorDataset(x, y), batch_size=len(x)
        )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model, optimizer, _ = dpseg.PrivacyEngine(accountant="rdp").make_private(
                module=model, optimizer=optimizer, data_loader=loader,
                noise_multiplier=1.0, max_grad_norm=1.0, poisson_sampling=False,
            )  # fmt: skip

    def step() -> dict[str, float]:
        times.clear()
        t = [time.perf_counter()]
        optimizer.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x), y)
        t.append(time.perf_counter())
        loss.backward()
        t.append(time.perf_counter())
        optimizer.step()
        t.append(time.perf_counter())
        row = {k: 1e3 * v for k, v in times.items()}
        row["[forward]"], row["[backward]"], row["[optimizer]"] = (
            1e3 * (b - a) for a, b in zip(t, t[1:], strict=False)
        )
        return row

    return step


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="PACKAGE.MODULE:CALLABLE")
    p.add_argument("--model-kwargs", default=None, help="JSON keyword arguments")
    p.add_argument("--size", type=int, default=48)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--steps", type=int, default=16, help="timed steps per engine")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--min-diff", type=float, default=0.3, help="list layers differing by more (ms)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    kwargs = parse_model_kwargs(args.model_kwargs)
    model = load_model(args.model, kwargs)
    x, y = example_batch(
        model, args.batch, args.size, in_channels=kwargs.get("in_channels", 1),
        spatial_dims=kwargs.get("spatial_dims", 3),
    )  # fmt: skip
    steps = {e: build(e, model, x, y) for e in ("none", "dpseg")}
    for s in steps.values():
        s(), s()  # warm-up: oneDNN primitives, dpseg's timed strategy choices
    rows: dict[str, list[dict]] = {e: [] for e in steps}
    for _ in range(args.steps):
        for e, s in steps.items():
            rows[e].append(s())
    keys = list(dict.fromkeys(k for r in rows["none"] + rows["dpseg"] for k in r))
    by_kind: dict[str, list[float]] = collections.defaultdict(lambda: [0.0, 0.0])
    print(
        f"{'layer':58s} {'none ms':>8s} {'dpseg ms':>8s} {'diff':>7s}"
        f"  (medians of {args.steps} steps)"
    )
    for k in keys:
        a = np.array([r.get(k, 0.0) for r in rows["none"]])
        b = np.array([r.get(k, 0.0) for r in rows["dpseg"]])
        d = float(np.median(b - a))
        kind = k if k.startswith("[") else k.split(":")[0]
        by_kind[kind][0] += float(np.median(a))
        by_kind[kind][1] += float(np.median(b))
        if abs(d) > args.min_diff and not k.startswith("["):
            print(f"{k[:58]:58s} {np.median(a):8.2f} {np.median(b):8.2f} {d:+7.2f}")
    print()
    for kind, (a, b) in by_kind.items():
        print(f"{'all ' + kind:58s} {a:8.2f} {b:8.2f} {b - a:+7.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
