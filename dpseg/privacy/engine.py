"""PrivacyEngine: the Opacus-shaped entry point (same call names and argument meanings)."""

from __future__ import annotations

import hashlib
import math
import numbers
import os
import warnings
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from torch.optim import Optimizer
from torch.utils.data import DataLoader

from dpseg import ops
from dpseg.privacy.accountants import (
    ACCOUNTANTS,
    USER_ACCOUNTANTS,
    Guarantee,
    accountant_for,
    make_accountant,
    noise_for_epsilon,
    steps_accounted,
)
from dpseg.privacy.criterion import DPCriterion
from dpseg.privacy.data_loader import DPDataLoader, track_units
from dpseg.privacy.distributed import DistributedContext, check_wrapper, take_reduction_from_ddp
from dpseg.privacy.optimizer import DPOptimizer
from dpseg.privacy.private_module import PrivateModule
from dpseg.privacy.sampling_plan import SamplingPlan, plan_sampling
from dpseg.privacy.units import UnitFeed
from dpseg.privacy.validate import validate

BACKENDS = ("auto", "torch", "cpp", "triton", "cuda")
LOSS_REDUCTIONS = ("mean", "sum")
# Opacus's per-sample modes. dpseg has one capture, exact for all of them; "ghost" also
# hands back the criterion, as Opacus's ghost clipping does.
GRAD_SAMPLE_MODES = ("hooks", "functorch", "ew", "ghost")


class PrivacyEngine:
    def __init__(self, accountant: str = "prv", secure_mode: bool = False):
        if accountant not in USER_ACCOUNTANTS:
            raise ValueError(
                f"unknown accountant {accountant!r}; use one of {sorted(USER_ACCOUNTANTS)}"
            )
        self.accountant = make_accountant(accountant)
        self.accountant_name = accountant  # the user's choice, used under add/remove
        self.secure_mode = secure_mode
        self.sample_rate: float | None = None
        # The Poisson sampler's source of uniforms, moved on when a checkpoint moves the step
        # counter on (load_checkpoint)
        self._sampling_stream: SamplingStream | None = None
        # The DPOptimizer make_private made last: a ledger loaded after it moves its counter
        self._optimizer: DPOptimizer | None = None
        # What the epsilon is about (unit, adjacency, sampling, accountant): set by
        # make_private, recorded in every ledger (dpseg.privacy.accountants.Guarantee).
        self.guarantee: Guarantee | None = None
        if secure_mode:
            warnings.warn(
                "secure_mode: noise seeds and Poisson sampling draw from the OS entropy "
                "source and each noise value sums 4 Gaussians (Opacus's defence against the "
                "floating-point attack); runs are not reproducible.",
                stacklevel=2,
            )

    def _check(self, noise_multiplier, max_grad_norm, loss_reduction, backend, noise_seed):
        for name, value in (
            ("max_grad_norm", max_grad_norm),
            ("noise_multiplier", noise_multiplier),
        ):
            if not math.isfinite(value):
                raise ValueError(f"{name} must be finite, got {value}")
        if not max_grad_norm > 0:
            raise ValueError(
                f"max_grad_norm must be > 0 (the clipping bound C), got {max_grad_norm}"
            )
        if not noise_multiplier >= 0:
            raise ValueError(f"noise_multiplier must be >= 0, got {noise_multiplier}")
        if noise_multiplier == 0:
            warnings.warn(
                "noise_multiplier=0: no noise is added, so nothing is private (get_epsilon "
                "returns inf); this runs the clipped, non-private step.",
                UserWarning,
                stacklevel=3,
            )
        if loss_reduction not in LOSS_REDUCTIONS:
            raise ValueError(
                f"loss_reduction must be one of {LOSS_REDUCTIONS}, got {loss_reduction!r}"
            )
        if backend not in BACKENDS:
            raise ValueError(f"unknown backend {backend!r}; use one of {BACKENDS}")
        if backend != "auto" and backend not in ops.available_backends():
            raise ValueError(
                f"backend {backend!r} is not available here (available: "
                f"{ops.available_backends()}); use backend='auto' or build it"
            )
        if noise_seed is not None and self.secure_mode:
            raise ValueError("noise_seed makes the noise predictable; it is refused in secure_mode")

    @staticmethod
    def _check_mode(grad_sample_mode: str | None) -> None:
        if grad_sample_mode is None:
            return
        if grad_sample_mode not in GRAD_SAMPLE_MODES:
            raise ValueError(
                f"grad_sample_mode={grad_sample_mode!r} is not supported by dpseg; use one of "
                f"{GRAD_SAMPLE_MODES} (all run dpseg's own exact per-sample capture)"
            )
        warnings.warn(
            f"grad_sample_mode={grad_sample_mode!r}: dpseg computes per-sample gradients with "
            "its own capture (one autograd Function per layer), exact for every Opacus mode; "
            "the argument is accepted so that Opacus code runs unchanged.",
            UserWarning,
            stacklevel=3,
        )

    def make_private(
        self,
        *,
        module: nn.Module,
        optimizer: Optimizer,
        data_loader: DataLoader,
        noise_multiplier: float,
        max_grad_norm: float,
        poisson_sampling: bool = True,
        loss_reduction: str = "mean",
        backend: str = "auto",
        noise_seed: int | None = None,
        batch_first: bool = True,
        clipping: str = "flat",
        allow_fallback: bool = True,
        grad_sample_mode: str | None = None,
        criterion: Any = None,
        noise_generator: torch.Generator | None = None,
        sample_rate: float | None = None,
        expected_batch_size: int | None = None,
        patient_ids: Sequence | None = None,
        items_per_patient: int = 1,
        privacy_unit: str | None = None,
    ):
        """Returns (module, optimizer, data_loader) ready for an ordinary training loop;
        with ``grad_sample_mode="ghost"``, (module, optimizer, criterion, data_loader), as
        Opacus does (the criterion defaults to CrossEntropyLoss, as Opacus's).

        dpseg's additions to Opacus's call:

        - ``sample_rate`` and ``expected_batch_size``: the Poisson rate q per step and the
          normaliser (the expected number of units a batch), public constants fixed in
          advance. With both (and Poisson sampling) nothing released depends on the
          dataset's size, and epsilon is for add/remove adjacency. Without them, q, the
          steps and the normaliser follow Opacus's convention (q = 1 / len(loader), E[B] =
          q N), which reads N: N is then public, and epsilon is reported for replace-one
          adjacency (dpseg.privacy.accountants).
        - ``patient_ids`` (one per dataset item; or a ``patient_ids`` attribute of the
          dataset) and ``items_per_patient`` k: the privacy unit is the patient. Poisson
          sampling runs over patients; each sampled patient brings k of its items; its rows
          are averaged and clipped as one. Without them the unit is the dataset item (whose
          rows, when it yields several, are still clipped together).
        - ``privacy_unit`` (or a ``privacy_unit`` attribute of the dataset): what the
          declared unit is called in the ledger and every report, "patient" by default.
          Name it for what it is: "case" where a subject may have several cases.
        """
        if noise_generator is not None:
            if noise_seed is not None or self.secure_mode:
                raise ValueError(
                    "noise_generator: give either it or noise_seed, and neither in secure_mode"
                )
            noise_seed = int(torch.randint(0, 2**63 - 1, (1,), generator=noise_generator))
        noise_multiplier = _real("noise_multiplier", noise_multiplier)
        max_grad_norm = _real("max_grad_norm", max_grad_norm)
        self._check(noise_multiplier, max_grad_norm, loss_reduction, backend, noise_seed)
        self._check_mode(grad_sample_mode)
        if grad_sample_mode == "ghost" and criterion is None:
            criterion = nn.CrossEntropyLoss()
        if not batch_first:
            raise ValueError("dpseg needs the batch in dimension 0 (batch_first=True)")
        if clipping != "flat":
            raise ValueError(f"clipping={clipping!r}: dpseg implements flat clipping only")
        if isinstance(module, PrivateModule):
            raise ValueError("this module was already made private; pass the original model")
        ddp = check_wrapper(module)  # refuses wrappers it cannot run exactly
        validate(ddp.module if ddp is not None else module)
        _check_optimizer(module, optimizer)
        plan = plan_sampling(
            data_loader,
            poisson_sampling=poisson_sampling,
            sample_rate=sample_rate,
            expected_batch_size=expected_batch_size,
            loss_reduction=loss_reduction,
            patient_ids=patient_ids,
            items_per_patient=items_per_patient,
            privacy_unit=privacy_unit,
        )
        distributed = DistributedContext(ddp.process_group) if ddp is not None else None
        dataset_size = len(data_loader.dataset)
        if distributed is not None and not distributed.all_equal(dataset_size):
            raise ValueError(
                "under DistributedDataParallel every rank's loader must hold the same, whole "
                f"dataset (this rank has {dataset_size} items): dpseg splits each Poisson draw "
                "by rank, as a DistributedSampler would"
            )
        self._adopt(plan)
        # A ledger loaded before (a resumed run): the noise counter and a seeded sampling
        # stream go on from its steps, so no step draws the noise or the batch of an earlier
        # one, whatever seed the resumed call is given.
        start = steps_accounted(self.accountant)
        feed = UnitFeed(plan.unit)
        self._sampling_stream = None
        if poisson_sampling:
            generator = None
            if noise_seed is not None:
                generator = torch.Generator().manual_seed(stream_seed(noise_seed, start))
            shard = (distributed.rank, distributed.world_size) if distributed else None
            data_loader = DPDataLoader.from_data_loader(
                data_loader,
                generator=generator,
                secure=self.secure_mode,
                distributed=shard,
                sample_rate=plan.sample_rate if plan.rate_declared else None,
                patients=plan.patients,
            )
            data_loader.unit_feed = feed
            stream = SamplingStream.of(data_loader, generator, noise_seed)
            if stream is not None and stream.owned is None:
                stream.move_to(start)  # (the generator built from noise_seed starts there)
            self._sampling_stream = stream
        else:
            data_loader = track_units(data_loader, feed)
        # backend="triton" means Triton end to end: the per-sample conv kernel too.
        conv_strategy = "triton" if backend == "triton" else None
        private = PrivateModule(module, allow_fallback=allow_fallback, conv_strategy=conv_strategy)
        private.unit_feed = feed
        if ddp is not None:
            take_reduction_from_ddp(ddp)
        dp_optimizer = DPOptimizer(
            optimizer,
            noise_multiplier=noise_multiplier,
            max_grad_norm=max_grad_norm,
            expected_batch_size=plan.expected_batch_size,
            loss_reduction=loss_reduction,
            backend=backend,
            noise_seed=noise_seed,
            secure_mode=self.secure_mode,
            distributed=distributed,
        )
        dp_optimizer.steps_taken = start
        self._optimizer = dp_optimizer
        q = plan.sample_rate
        dp_optimizer.step_hook = lambda opt: self.accountant.step(
            noise_multiplier=opt.noise_multiplier, sample_rate=q
        )
        dp_criterion, checked = None, False
        if criterion is not None:
            dp_criterion = DPCriterion(criterion, loss_reduction, feed)
            # Plain mode hands nothing back: the loop calls the user's own loss object,
            # checked there. Ghost mode's loop calls the wrapper, which checks.
            checked = grad_sample_mode == "ghost" or dp_criterion.watch()
        _say_what_epsilon_means(plan, self.guarantee, criterion, checked)
        if grad_sample_mode == "ghost":
            return private, dp_optimizer, dp_criterion, data_loader
        return private, dp_optimizer, data_loader

    def _adopt(self, plan: SamplingPlan) -> None:
        """Takes the plan's guarantee and the accountant that holds for it; a ledger loaded
        before (a resumed run) must have been kept under the same."""
        name = accountant_for(self.accountant_name, plan.adjacency, plan.sampling)
        guarantee = Guarantee(plan.unit, plan.adjacency, plan.sampling, name)
        held = self.guarantee
        if held is not None and held != guarantee and len(self.accountant.history):
            raise ValueError(
                f"this engine's ledger is kept {held.describe()}; this call would account "
                f"{guarantee.describe()}. A ledger is kept under one guarantee: use a new "
                "PrivacyEngine, or the same sampling settings as before (sample_rate, "
                "expected_batch_size, patient_ids, privacy_unit, poisson_sampling)."
            )
        if self.accountant.mechanism() != name:
            history = list(self.accountant.history)
            if history:
                raise ValueError(
                    f"the ledger holds {len(history)} entries accounted with "
                    f"{self.accountant.mechanism()!r}; this call needs {name!r} "
                    f"({guarantee.describe()})"
                )
            self.accountant = make_accountant(name)
        self.guarantee = guarantee
        self.sample_rate = plan.sample_rate

    def make_private_with_epsilon(
        self,
        *,
        module: nn.Module,
        optimizer: Optimizer,
        data_loader: DataLoader,
        target_epsilon: float,
        target_delta: float,
        epochs: int,
        max_grad_norm: float,
        epsilon_tolerance: float = 0.01,
        **kwargs,
    ):
        """Finds the smallest noise multiplier that spends ``target_epsilon`` in ``epochs``
        passes, under the accountant that will report the run's epsilon."""
        if not target_epsilon > 0:
            raise ValueError(f"target_epsilon must be > 0, got {target_epsilon}")
        if not 0 < target_delta < 1:
            raise ValueError(f"target_delta must be in (0, 1), got {target_delta}")
        if not epochs >= 1:
            raise ValueError(f"epochs must be >= 1, got {epochs}")
        plan_keys = (
            "poisson_sampling",
            "sample_rate",
            "expected_batch_size",
            "loss_reduction",
            "patient_ids",
            "items_per_patient",
            "privacy_unit",
        )
        plan = plan_sampling(data_loader, **{k: kwargs[k] for k in plan_keys if k in kwargs})
        accountant = accountant_for(self.accountant_name, plan.adjacency, plan.sampling)
        sigma = noise_for_epsilon(
            target_epsilon,
            target_delta,
            plan.sample_rate,
            int(epochs * plan.steps_per_epoch),
            accountant,
            epsilon_tolerance,
        )
        return self.make_private(
            module=module,
            optimizer=optimizer,
            data_loader=data_loader,
            noise_multiplier=sigma,
            max_grad_norm=max_grad_norm,
            **kwargs,
        )

    def get_epsilon(self, delta: float) -> float:
        """Epsilon spent so far, at ``delta``, for the guarantee in ``self.guarantee`` (the
        unit, the adjacency and the sampling; ``get_privacy_spent`` returns them together)."""
        if not 0 < delta < 1:
            raise ValueError(f"delta must be in (0, 1), got {delta}")
        if len(self.accountant) == 0:
            return 0.0
        if any(entry[0] == 0 for entry in self.accountant.history):
            return math.inf  # a step without noise released its gradient as it was
        return float(self.accountant.get_epsilon(delta=delta))

    def get_privacy_spent(self, delta: float) -> dict:
        """{"epsilon", "delta", "steps", "unit", "adjacency", "sampling", "accountant"}."""
        guarantee = self.guarantee or Guarantee(accountant=self.accountant.mechanism())
        return {
            "epsilon": self.get_epsilon(delta),
            "delta": delta,
            "steps": steps_accounted(self.accountant),
            **guarantee.as_dict(),
        }

    # A resumed run must keep its ledger: epsilon never resets.
    def state_dict(self) -> dict:
        state = {
            "accountant": self.accountant.mechanism(),
            "history": list(self.accountant.history),
        }
        if self.guarantee is not None:
            state.update(self.guarantee.as_dict())
        return state

    def load_state_dict(self, state: dict) -> None:
        """Takes dpseg's state_dict() or an Opacus accountant's ({"history", "mechanism"})."""
        name = state.get("accountant", state.get("mechanism"))
        if name not in ACCOUNTANTS:
            raise ValueError(f"the ledger's accountant {name!r} is not one dpseg knows")
        requested = name if name in USER_ACCOUNTANTS else None
        if self.guarantee is None:
            # Not made private yet: the ledger says what it was kept under; make_private
            # must then arrive at the same (checked in _adopt).
            if requested is not None and requested != self.accountant_name:
                raise ValueError(
                    f"checkpoint was accounted with {name!r}, this engine uses "
                    f"{self.accountant_name!r}; create PrivacyEngine(accountant={name!r})"
                )
            if self.accountant.mechanism() != name:
                self.accountant = make_accountant(name)
            if "adjacency" in state:
                self.guarantee = Guarantee(
                    state.get("unit", "item"),
                    state["adjacency"],
                    state.get("sampling", "poisson"),
                    name,
                )
        else:
            if name != self.accountant.mechanism():
                raise ValueError(
                    f"checkpoint was accounted with {name!r}, this run with "
                    f"{self.accountant.mechanism()!r} ({self.guarantee.describe()}); resume "
                    "with the same accountant and sampling settings"
                )
            for key in ("unit", "adjacency", "sampling"):
                if key in state and state[key] != getattr(self.guarantee, key):
                    raise ValueError(
                        f"checkpoint's ledger is per {key} {state[key]!r}, this run's "
                        f"{getattr(self.guarantee, key)!r}; resume with the same settings"
                    )
        self.accountant.history = [tuple(h) for h in state["history"]]
        self._move_on(steps_accounted(self.accountant))

    def _move_on(self, steps: int) -> None:
        """A ledger of ``steps`` loaded after make_private (Opacus's order: make_private, then
        the checkpoint): the noise counter and the sampling stream go on from its steps, as
        make_private starts them after a ledger loaded first. Left alone when the counter is
        already there (a ledger reloaded mid-run)."""
        opt = self._optimizer
        if opt is None or steps <= opt.steps_taken:
            return
        opt.steps_taken = steps
        if self._sampling_stream is not None:
            self._sampling_stream.move_to(steps)

    # --- Opacus's checkpoint calls ---------------------------------------------------------
    def save_checkpoint(
        self,
        *,
        path: str | os.PathLike,
        module: nn.Module,
        optimizer: DPOptimizer,
        checkpoint_dict: dict | None = None,
        module_state_dict_kwargs: dict | None = None,
        torch_save_kwargs: dict | None = None,
    ) -> None:
        """Saves module, optimizer and accountant under Opacus's keys (module_state_dict,
        optimizer_state_dict, privacy_accountant_state_dict), plus ``checkpoint_dict``.

        The optimizer is required, unlike Opacus: its state holds the step counter that
        keys the Philox noise, and a run resumed without it would draw the same noise again.
        """
        _require_dp_optimizer(optimizer, "save_checkpoint")
        checkpoint = dict(checkpoint_dict or {})
        checkpoint["module_state_dict"] = module.state_dict(**(module_state_dict_kwargs or {}))
        checkpoint["optimizer_state_dict"] = optimizer.state_dict()
        checkpoint["privacy_accountant_state_dict"] = {
            "history": list(self.accountant.history),
            "mechanism": self.accountant.mechanism(),
            **(self.guarantee.as_dict() if self.guarantee is not None else {}),
        }
        torch.save(checkpoint, path, **(torch_save_kwargs or {}))

    def load_checkpoint(
        self,
        *,
        path: str | os.PathLike,
        module: nn.Module,
        optimizer: DPOptimizer,
        module_load_dict_kwargs: dict | None = None,
        torch_load_kwargs: dict | None = None,
    ) -> dict:
        """Restores what save_checkpoint wrote; returns the rest of the checkpoint (what was
        passed as ``checkpoint_dict``). Epsilon and the noise counter continue: the next
        step draws noise no earlier step drew."""
        _require_dp_optimizer(optimizer, "load_checkpoint")
        checkpoint = torch.load(path, **{"weights_only": True, **(torch_load_kwargs or {})})
        missing = {"module_state_dict", "privacy_accountant_state_dict"} - set(checkpoint)
        if missing:
            raise ValueError(f"{path}: not a PrivacyEngine checkpoint (no {sorted(missing)})")
        module.load_state_dict(
            checkpoint.pop("module_state_dict"), **(module_load_dict_kwargs or {})
        )
        self.load_state_dict(checkpoint.pop("privacy_accountant_state_dict"))
        optimizer_state = checkpoint.pop("optimizer_state_dict", None)
        if optimizer_state:
            optimizer.load_state_dict(optimizer_state)
        # A checkpoint from elsewhere may lack dpseg's counter: never behind the ledger.
        optimizer.steps_taken = max(optimizer.steps_taken, steps_accounted(self.accountant))
        if self._sampling_stream is not None:
            self._sampling_stream.move_to(optimizer.steps_taken)
        return checkpoint


def _real(name: str, value) -> float:
    """A real number as a float: Python's, NumPy's or a one-element tensor."""
    if isinstance(value, torch.Tensor) and value.numel() == 1 and not value.dtype.is_complex:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be a real number, got {value!r}")
    return float(value)


class SamplingStream:
    """Where a Poisson sampler's uniforms come from, so that a resumed run does not draw an
    earlier run's batches again.

    A run resumed at step k that replays the first run's sampling stream gives its step k + j
    the batch of step j: the two steps' batches are then not independent, which the
    subsampled Gaussian's accounting assumes. Seeded scripts do exactly that (``noise_seed``,
    a user's ``torch.Generator().manual_seed(0)``, or ``torch.manual_seed(0)`` at the top with
    the sampler on the global generator; an unseeded ``torch.Generator()`` even starts from a
    constant). So the stream is named by a base seed (``noise_seed``; else the sampler's
    generator's seed; else the global generator's) and, from a resumed step k > 0, the
    sampler draws from ``stream_seed(base, k)``: reproducible, and not the first run's.
    A fresh run (k = 0) samples as it always did. Secure mode's sampler reads OS entropy."""

    def __init__(self, loader: DPDataLoader, base: int, owned: torch.Generator | None):
        self.loader, self.base, self.owned = loader, base, owned

    @classmethod
    def of(cls, loader: DPDataLoader, built: torch.Generator | None, noise_seed: int | None):
        """The stream of ``loader``'s sampler (None where it reads OS entropy); ``built`` is
        the generator make_private made from ``noise_seed``."""
        sampler = loader.batch_sampler
        if getattr(sampler, "secure", True):
            return None
        generator = sampler.generator
        if built is not None and generator is built:
            return cls(loader, noise_seed, built)
        base = generator.initial_seed() if generator is not None else torch.initial_seed()
        return cls(loader, base, None)

    def move_to(self, steps: int) -> None:
        """Draws the batches of steps ``steps``, ``steps`` + 1, ... from now on (and the
        workers' base seeds: one generator serves both, as before)."""
        seed = stream_seed(self.base, steps)
        if self.owned is not None:
            self.owned.manual_seed(seed)
        elif steps > 0:  # a new generator: the user's own one is left as it is
            generator = torch.Generator().manual_seed(seed)
            self.loader.batch_sampler.generator = generator
            self.loader.generator = generator


def stream_seed(seed: int, steps: int) -> int:
    """The seed of a sampling stream that starts after ``steps`` steps: ``seed`` itself for a
    fresh run (its batches as before), a hash of both for a resumed one (not the fresh run's
    first batches again)."""
    if steps == 0:
        return seed
    digest = hashlib.sha256(f"dpseg-sampling:{seed}:{steps}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def _check_optimizer(module: nn.Module, optimizer: Optimizer) -> None:
    model_params = {id(p) for p in module.parameters()}
    stray = [
        tuple(p.shape)
        for g in optimizer.param_groups
        for p in g["params"]
        if p.requires_grad and id(p) not in model_params
    ]
    if stray:
        raise ValueError(
            f"the optimizer updates parameters not in the module (shapes {stray}); DP "
            "needs every trained parameter inside the model made private"
        )


def _say_what_epsilon_means(plan: SamplingPlan, guarantee: Guarantee, criterion, checked: bool):
    """One warning that names what the epsilon is about and what was changed or assumed."""
    notes = list(plan.notes)
    if plan.unit == "item":
        notes.append(
            "epsilon is per dataset item: no patients were declared. If a patient has several "
            "items (slices, patches, visits), declare them with make_private(..., "
            "patient_ids=[patient of each item], items_per_patient=k) or a patient_ids "
            "attribute on the dataset; a multi-sample item (MONAI's num_samples=k under "
            "list_data_collate) is already clipped as one."
        )
    if plan.adjacency == "replace-one" and plan.sampling == "poisson":
        notes.append(
            "q, the steps and the normaliser were derived from the dataset's size (q = 1 / "
            "len(loader), expected batch = q N), so N is treated as public and epsilon is "
            "for replace-one adjacency (about twice the add/remove figure). Pass "
            "sample_rate= and expected_batch_size= (constants fixed in advance) for "
            "add/remove."
        )
    if plan.sampling == "shuffled":
        notes.append(
            "poisson_sampling=False: fixed shuffled batches are not Poisson samples, so no "
            "amplification by subsampling is claimed; epsilon composes one Gaussian release "
            "per pass over the data (replace-one, sensitivity 2C). Poisson sampling gives a "
            "far smaller epsilon for the same noise."
        )
    coupled = (
        "a loss that couples the samples of a batch (MONAI's DiceLoss(batch=True), class "
        "weights or ignore_index under a 'mean' reduction, top-k) voids the clipping bound."
    )
    if criterion is None:
        notes.append(
            f"dpseg cannot see your loss: {coupled} Pass criterion=your_loss to have it "
            "checked on the first batch, or check it with dpseg.check_loss(loss_fn, output, "
            "target)."
        )
    elif not checked:
        notes.append(
            f"criterion={getattr(criterion, '__name__', type(criterion).__name__)} is a "
            f"function, whose calls in your loop dpseg cannot see, so it is not checked: "
            f"{coupled} Pass it as an nn.Module (checked on its first call), use "
            "grad_sample_mode='ghost' and the criterion it returns, or check it with "
            "dpseg.check_loss(loss_fn, output, target)."
        )
    warnings.warn(
        f"make_private: epsilon is {guarantee.describe()}.\n- " + "\n- ".join(notes),
        UserWarning,
        stacklevel=3,
    )


def _require_dp_optimizer(optimizer, call: str) -> None:
    if not isinstance(optimizer, DPOptimizer):
        raise TypeError(
            f"{call} needs the DPOptimizer that make_private returned (optimizer=...), got "
            f"{type(optimizer).__name__}: its step counter keys the noise, and without it a "
            "resumed run would draw the same noise twice"
        )
