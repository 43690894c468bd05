"""DPOptimizer: wraps any torch optimizer; its step() is the fused DP-SGD step.

After ``loss.backward()`` each trainable parameter holds ``grad_sample`` (B, *shape) from
the capture. ``step()`` then, in one fused pass over all parameters (dpseg.ops):

    n_b = ||(g_b over every parameter)||        (total per-sample norm, accumulated in fp64)
    c_b = min(1, C / (n_b + 1e-6))
    p.grad = scale * (sum_b c_b g_b + N(0, sigma^2 C^2))   scale = 1/expected_batch for "mean"

and calls the wrapped optimizer. With loss_reduction="mean" autograd hands over g_b / B (B
the actual batch), so the factor B is folded into c_b rather than into a copy of the grads.
Noise is Philox keyed by (seed, step, element): reproducible with ``noise_seed``, and each
step's noise is new because the step counter is part of the key.

Virtual steps (:class:`dpseg.BatchMemoryManager`): after ``signal_skip_step()``, ``step()``
clips the physical batch's samples and adds them to a running clipped sum (one
parameter-sized buffer) instead of updating; ``zero_grad()`` keeps that sum. The step that
ends the logical batch adds its own clipped samples, then draws the noise once, scales once
by the logical expected batch size, updates once and tells the accountant once:

    p.grad = scale * (sum over the logical batch of c_b g_b + N(0, sigma^2 C^2))
"""

from __future__ import annotations

import secrets
from collections import OrderedDict
from collections.abc import Callable

import torch
from torch.optim import Optimizer

from dpseg import ops
from dpseg.privacy.ranges import profiled
from dpseg.privacy.units import RowUnits

_CLIP_EPS = 1e-6  # as Opacus: c_b = C / (n_b + 1e-6)


class DPOptimizer(Optimizer):
    def __init__(
        self,
        optimizer: Optimizer,
        *,
        noise_multiplier: float,
        max_grad_norm: float,
        expected_batch_size: int,
        loss_reduction: str = "mean",
        backend: str = "auto",
        noise_seed: int | None = None,
        secure_mode: bool = False,
        distributed=None,
    ):
        # Not Optimizer.__init__: param_groups/state/defaults stay the wrapped optimizer's own
        # objects (below), so schedulers and checkpoints see one set of hyper-parameters.
        self.original_optimizer = optimizer
        self.noise_multiplier = float(noise_multiplier)
        self.max_grad_norm = float(max_grad_norm)
        # The normaliser: a public constant (expected units a batch), maybe fractional.
        e = float(expected_batch_size)
        self.expected_batch_size = int(e) if e.is_integer() else e
        self.loss_reduction = loss_reduction
        self.backend = backend
        self.secure_mode = secure_mode
        # A DistributedContext: the clipped sums are all-reduced, rank 0 adds the noise.
        self.distributed = distributed
        if noise_seed is None:
            # As Opacus: from torch's default generator, so torch.manual_seed makes a run
            # reproducible. Secure mode draws a fresh OS-entropy seed every step instead.
            noise_seed = int(torch.randint(0, 2**63 - 1, (1,)))
        self.noise_seed = noise_seed
        self.steps_taken = 0
        self.step_hook: Callable[[DPOptimizer], None] | None = None
        self.last_per_sample_norms: torch.Tensor | None = None
        self.last_clipped_fraction: float | None = None
        # Virtual steps: whether the next step() only accumulates, and what has been
        # accumulated of the logical batch so far.
        self._skip_next_step = False
        self._is_last_step_skipped = False
        self._clipped_sum: list[torch.Tensor] | None = None
        self._logical_norms: list[torch.Tensor] = []
        self._optimizer_step_pre_hooks = OrderedDict()
        self._optimizer_step_post_hooks = OrderedDict()
        self._optimizer_state_dict_pre_hooks = OrderedDict()
        self._optimizer_state_dict_post_hooks = OrderedDict()
        self._optimizer_load_state_dict_pre_hooks = OrderedDict()
        self._optimizer_load_state_dict_post_hooks = OrderedDict()

    # --- the wrapped optimizer's state, shared rather than copied -------------------------
    @property
    def param_groups(self):
        return self.original_optimizer.param_groups

    @param_groups.setter
    def param_groups(self, value):
        self.original_optimizer.param_groups = value

    @property
    def state(self):
        return self.original_optimizer.state

    @state.setter
    def state(self, value):
        self.original_optimizer.state = value

    @property
    def defaults(self):
        return self.original_optimizer.defaults

    @defaults.setter
    def defaults(self, value):
        self.original_optimizer.defaults = value

    def add_param_group(self, param_group: dict) -> None:
        self.original_optimizer.add_param_group(param_group)

    def __repr__(self) -> str:
        return (
            f"DPOptimizer(sigma={self.noise_multiplier}, C={self.max_grad_norm}, "
            f"{self.original_optimizer!r})"
        )

    @property
    def params(self) -> list[torch.nn.Parameter]:
        return [p for group in self.param_groups for p in group["params"] if p.requires_grad]

    # --- the DP step -----------------------------------------------------------------------
    def signal_skip_step(self, do_skip: bool = True) -> None:
        """The next step() ends a physical batch but not the logical one (Opacus's call;
        BatchMemoryManager makes it): clip and accumulate, do not update."""
        self._skip_next_step = bool(do_skip)

    @property
    def accumulating(self) -> bool:
        """True while a logical batch is partly accumulated (between skipped steps)."""
        return self._clipped_sum is not None

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.params:
            p.grad_sample = None
            p._dpseg_units = None
        if not self._is_last_step_skipped:
            self.discard_accumulated()
        self.original_optimizer.zero_grad(set_to_none)

    def discard_accumulated(self) -> None:
        """Drops a partly accumulated logical batch (nothing of it was released)."""
        self._clipped_sum = None
        self._logical_norms = []
        self._is_last_step_skipped = False

    def _per_sample_grads(self) -> tuple[list[torch.Tensor], RowUnits]:
        """Per-unit gradients (units, *shape) of every parameter, as the capture reduced
        them, and the batch's unit map."""
        params = self.params
        grads = [getattr(p, "grad_sample", None) for p in params]
        batches = {g.shape[0] for g in grads if g is not None}
        if len(batches) > 1:
            raise RuntimeError(
                f"per-sample gradients disagree on the batch size: {sorted(batches)}"
            )
        maps = {id(m): m for p in params if (m := getattr(p, "_dpseg_units", None)) is not None}
        if len(maps) > 1:
            raise RuntimeError("per-sample gradients of one step carry two different unit maps")
        batch = batches.pop() if batches else 0  # no backward at all = an empty Poisson batch
        units = maps.popitem()[1] if maps else RowUnits.identity(batch)
        if units.num_units != batch:
            raise RuntimeError(
                f"per-sample gradients hold {batch} rows, their unit map {units.num_units} units"
            )
        # A parameter this batch did not reach contributes zeros (but still gets noise).
        grads = [
            g if g is not None else p.new_zeros((batch, *p.shape))
            for p, g in zip(params, grads, strict=True)
        ]
        return grads, units

    def _clip_factors(
        self, grads: list[torch.Tensor], units: RowUnits
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(per-unit norms, factors to apply to the per-unit sums as the capture left them).

        A unit's gradient is the mean of its rows' per-sample gradients. Autograd hands
        each row over divided by the batch's row count R under loss_reduction="mean", and
        the capture summed the rows of each unit, so unit u's gradient is its sum times
        R / k_u ("sum": 1 / k_u); that factor is folded into the clip factor rather than
        into a copy of the grads (dpseg.privacy.units.RowUnits.row_scale)."""
        scale_in = units.row_scale(self.loss_reduction).to(grads[0].device if grads else "cpu")
        with profiled("dpseg::per_sample_norms"):
            sq_norms = ops.per_sample_sq_norms(grads, backend=self.backend)
        norms = sq_norms.sqrt() * scale_in
        bad = (~torch.isfinite(norms)).nonzero().flatten()
        if bad.numel():
            raise FloatingPointError(
                f"per-sample gradient norm is not finite for {units.unit}(s) {bad.tolist()} "
                "of this batch (loss or activations overflowed); no update was applied. Lower "
                "the learning rate, check the inputs for NaN/inf, or use a smaller loss scale."
            )
        factors = (self.max_grad_norm / (norms + _CLIP_EPS)).clamp(max=1.0)
        return norms, factors * scale_in

    def _noise_args(self) -> dict:
        return dict(
            noise_std=self.noise_multiplier * self.max_grad_norm,
            scale=1.0 / self.expected_batch_size if self.loss_reduction == "mean" else 1.0,
            seed=secrets.randbits(64) if self.secure_mode else self.noise_seed,
            step=self.steps_taken,
            draws=4 if self.secure_mode else 1,
            backend=self.backend,
        )

    def pre_step(self) -> bool:
        """Clips this physical batch; returns True when the update is to be applied (p.grad
        holds the noised, scaled sum of the logical batch), False after a skipped step.
        Raises before touching anything on a non-finite per-sample norm."""
        params = self.params
        grads, units = self._per_sample_grads()
        norms, factors = self._clip_factors(grads, units)
        skip, self._skip_next_step = self._skip_next_step, False
        self._is_last_step_skipped = skip
        if not skip and self._clipped_sum is None and self.distributed is None:
            # One physical batch per step: clip, sum and noise in one fused pass.
            with profiled("dpseg::clip_accumulate_noise"):
                summed = ops.clip_accumulate_noise(grads, factors, **self._noise_args())
            self._record_norms([norms])
        else:
            with profiled("dpseg::clip_accumulate"):
                part = ops.clip_accumulate_noise(
                    grads, factors, noise_std=0.0, scale=1.0, seed=0, step=0, backend=self.backend
                )
            if self._clipped_sum is None:
                self._clipped_sum = part
            else:
                for acc, g in zip(self._clipped_sum, part, strict=True):
                    acc.add_(g)
            self._logical_norms.append(norms)
            summed = None
            if not skip:  # the logical batch ends: one noise draw over its clipped sum
                summed = self._release(self._clipped_sum)
                self._record_norms(self._logical_norms)
                self.discard_accumulated()
        for i, p in enumerate(params):
            p.grad_sample = None
            p._dpseg_units = None
            if summed is not None:
                p.grad = summed[i]
        return summed is not None

    def _release(self, sums: list[torch.Tensor]) -> list[torch.Tensor]:
        """The logical batch's clipped sums -> the gradient released: noised once, scaled
        once; under torch.distributed, rank 0 noises its own sum and one all-reduce adds
        every rank's (dpseg.privacy.distributed)."""
        args = self._noise_args()
        ones = torch.ones(1, dtype=torch.float64, device=sums[0].device)
        rows = [s.unsqueeze(0) for s in sums]
        if self.distributed is None:
            with profiled("dpseg::noise"):
                return ops.clip_accumulate_noise(rows, ones, **args)
        scale = args.pop("scale")
        if self.distributed.rank != 0:
            args["noise_std"] = 0.0
        with profiled("dpseg::noise"):
            noised = ops.clip_accumulate_noise(rows, ones, scale=1.0, **args)
        with profiled("dpseg::all_reduce"):
            reduced = self.distributed.all_reduce_flat(noised)
        return [r.mul_(scale) for r in reduced]

    def _record_norms(self, norms: list[torch.Tensor]) -> None:
        norms = torch.cat(norms) if norms else torch.zeros(0, dtype=torch.float64)
        self.last_per_sample_norms = norms
        clipped = (self.max_grad_norm / (norms + _CLIP_EPS)) < 1  # the clip factor acted
        self.last_clipped_fraction = float(clipped.float().mean()) if norms.numel() else 0.0

    def step(self, closure: Callable[[], float] | None = None):
        if closure is not None:
            with torch.enable_grad():
                closure()
        if not self.pre_step():
            return None
        with profiled("dpseg::optimizer_update"):
            result = self.original_optimizer.step()
        self.steps_taken += 1
        if self.step_hook is not None:
            self.step_hook(self)
        return result

    # --- checkpoints: the step counter keys the noise, so it travels with the state --------
    def state_dict(self) -> dict:
        sd = self.original_optimizer.state_dict()
        sd["dpseg"] = {"steps_taken": self.steps_taken}
        if not self.secure_mode:
            sd["dpseg"]["noise_seed"] = self.noise_seed
        return sd

    def load_state_dict(self, state_dict: dict) -> None:
        state_dict = dict(state_dict)
        dp = state_dict.pop("dpseg", {})
        self.original_optimizer.load_state_dict(state_dict)
        # Never back: a counter behind this one would draw its noise again.
        self.steps_taken = max(self.steps_taken, int(dp.get("steps_taken", 0)))
        if "noise_seed" in dp and not self.secure_mode:
            self.noise_seed = int(dp["noise_seed"])
