"""The conv input gradient by each method dpseg's conv rule chooses between, per layer shape.

``choose_input_grad`` (dpseg/privacy/rules/conv_weight_grad.py) times, for each layer shape,
ATen's backward-data kernel (what ordinary autograd runs) against the same gradient as a
forward conv (the kernel flipped), and keeps the faster. This script shows what it chooses
from on the layers of MONAI's networks where the two differ most: few-channel layers.
Methods are interleaved round by round in one process; the table gives the median over
rounds and each method's ratio to backward-data. Each is checked against backward-data
before it is timed.

    .venv/bin/python bench/conv_input_grad.py --threads 2 --rounds 15
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from dpseg.privacy.rules import conv_weight_grad as cwg  # noqa: E402

# name, (Cout, Cin, kernel), spatial size; stride 1, "same" padding, batch 2
LAYERS = [
    ("SegResNet / DynUNet head 16->2, 1x1x1", (2, 16, 1), 48),
    ("UNETR / SwinUNETR head 16->2, 1x1x1", (2, 16, 1), 64),
    ("a 32->16 1x1x1 (SegResNet's up path)", (16, 32, 1), 24),
    ("MONAI UNet's last conv 2->2, 3x3x3", (2, 2, 3), 48),
    ("16->16, 3x3x3", (16, 16, 3), 48),
]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--batch", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    print(f"input gradient, batch {args.batch}, {args.threads} threads: median ms over "
          f"{args.rounds} interleaved rounds (x backward-data)")  # fmt: skip
    for name, (cout, cin, k), n in LAYERS:
        x = torch.randn(args.batch, cin, n, n, n, generator=g)
        w = torch.randn(cout, cin, k, k, k, generator=g)
        geometry = ([1] * 3, [k // 2] * 3, [1] * 3, False, [0] * 3, 1)
        go = torch.randn(args.batch, cout, n, n, n, generator=g)
        operands = (go, x, w, *geometry)
        methods = {
            m: (lambda fn=fn, operands=operands: fn(*operands))
            for m, (fn, fits) in cwg._INPUT_GRADS.items()
            if fits(*operands)
        }
        want = methods["backward"]()
        for fn in methods.values():  # the same gradient, or the timing means nothing
            torch.testing.assert_close(fn(), want, rtol=1e-4, atol=1e-4 * want.abs().max())
        times: dict[str, list[float]] = {m: [] for m in methods}
        for r in range(args.rounds):
            order = list(methods)[r % len(methods) :] + list(methods)[: r % len(methods)]
            for m in order:
                start = time.perf_counter()
                methods[m]()
                times[m].append(time.perf_counter() - start)
        base = statistics.median(times["backward"])
        cells = [
            f"{m} {1e3 * statistics.median(t):.2f} ({statistics.median(t) / base:.2f}x)"
            for m, t in times.items()
        ]
        print(f"  {name} at {n}^3: " + ", ".join(cells))


if __name__ == "__main__":
    main()
