"""SegResNet's DP/non-private ratio moves between processes: two suspects, tested.

One process per call, the bench of run.sh (15 interleaved rounds, SegResNet init 16, 48^3,
batch 2, 2 threads), with:

  plain         as run.sh runs it;
  choices-a     every conv's per-sample strategy and input-gradient method fixed to what one
                1.06x process chose (no timing: the same choices in every process);
  choices-b     fixed to what one 1.12x process chose;
  gc-off        Python's garbage collector off (dpseg's step makes more Python objects).

    .venv/bin/python docs/results/floor26/idle8/segresnet_spread.py MODE OUT
"""

from __future__ import annotations

import gc
import sys

import dpseg.privacy.rules.conv_weight_grad as cwg
from dpseg.cli import main

# weight shape -> per-sample strategy, as chosen in two processes of the 33d56da bench
CHOICES_A = {
    (16, 1, 3, 3, 3): "direct", (128, 128, 3, 3, 3): "fused", (64, 128, 1, 1, 1): "fused",
    (16, 16, 3, 3, 3): "grouped", (2, 16, 1, 1, 1): "fused", (32, 16, 3, 3, 3): "grouped",
    (16, 32, 1, 1, 1): "grouped", (32, 32, 3, 3, 3): "fused", (64, 32, 3, 3, 3): "grouped",
    (128, 64, 3, 3, 3): "fused", (32, 64, 1, 1, 1): "fused", (64, 64, 3, 3, 3): "fused",
}  # fmt: skip
CHOICES_B = {
    **CHOICES_A,
    (16, 16, 3, 3, 3): "loop", (2, 16, 1, 1, 1): "grouped", (32, 16, 3, 3, 3): "loop",
    (16, 32, 1, 1, 1): "patches", (32, 32, 3, 3, 3): "grouped",
}  # fmt: skip
# weight shape -> input-gradient method (backward-data where not named)
FORWARD_A = {(16, 16, 3, 3, 3), (32, 32, 3, 3, 3)}
FORWARD_B = {(16, 16, 3, 3, 3), (2, 16, 1, 1, 1)}


def fix_choices(weights: dict, forward: set) -> None:
    timed = cwg.choose_strategy

    def strategy(go, x, w, *geometry, need_input_grad=False):
        name = weights.get(tuple(w.shape))
        if name is None or x.shape[0] < 2:
            return timed(go, x, w, *geometry, need_input_grad=need_input_grad)
        return "grouped" if name == "fused" and not need_input_grad else name

    def input_grad(go, x, w, *geometry):
        fits = cwg._forward_input_grad_fits(go, x, w, *geometry)
        return "forward" if fits and tuple(w.shape) in forward else "backward"

    cwg.choose_strategy, cwg.choose_input_grad = strategy, input_grad


if __name__ == "__main__":
    mode, out = sys.argv[1], sys.argv[2]
    if mode == "choices-a":
        fix_choices(CHOICES_A, FORWARD_A)
    elif mode == "choices-b":
        fix_choices(CHOICES_B, FORWARD_B)
    elif mode == "gc-off":
        gc.disable()
    elif mode != "plain":
        raise SystemExit(f"unknown mode {mode!r}: plain, choices-a, choices-b or gc-off")
    kwargs = '{"spatial_dims": 3, "in_channels": 1, "out_channels": 2, "init_filters": 16}'
    sys.argv = [
        "dpseg", "bench", "--engines", "none,dpseg", "--repeats", "15", "--round-seconds",
        "1", "--size", "48", "--batch", "2", "--model", "monai.networks.nets:SegResNet",
        "--model-kwargs", kwargs, "--out", out,
    ]  # fmt: skip
    main()
