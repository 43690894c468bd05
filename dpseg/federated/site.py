"""A site (one hospital): its data, its model copy, optimizer, DP engine and privacy ledger.

``Site.fit(weights, local_steps, config)`` is one round: load the global weights, take
``local_steps`` optimizer steps on the site's own patients, return the change of weights.
Everything that must survive between rounds (optimizer moments, the DP step counter, the
accountant history, the site's step count) is in ``state_dict()``, so the same object runs
inside the in-process simulator or a Flower ClientApp that is rebuilt for every round.

The site's randomness is keyed by its secret (dpseg.privacy.secret): step t's Poisson draw,
patches and Opacus noise are functions of (key, t) (dpseg.train.loop.reseed_step), and
dpseg's Philox noise of (noise seed, t) with the noise seed derived from the key. The
secret never enters ``state_dict()``: a checkpoint, which the simulator writes beside its
report, carries no generator state or noise seed from which anyone could replay the
batches or subtract the noise. Resuming needs the secret again (the simulator keeps it in
OUT/secret.key, a Flower site in its state-dir) and then replays the uninterrupted run
exactly.

Engines, on the same model, data, batches and seeds so that runs compare like for like:

- ``dpseg``: dpseg.PrivacyEngine (fused per-sample clipping and Philox noise).
- ``opacus``: opacus.PrivacyEngine with ``grad_sample_mode="hooks"`` (Opacus's default) by
  default. Opacus has no per-sample rule for ConvTranspose3d: its hooks fall back to
  functorch for that layer, and vmap over an empty Poisson batch (which a site with few
  patients draws now and then) fails. The federated workload therefore builds
  ``UNet(upsample="interp")`` (1x1 conv + trilinear upsampling, all hook-native) for
  *every* engine; a model with ConvTranspose under Opacus gets a warning.
- ``none``: the same loop without privacy (the floor for time and the ceiling for Dice).

All three draw batches from the same Poisson sampler (dpseg.privacy.DPDataLoader with the
site's own generator): Opacus is given it with ``poisson_sampling=False``, so it accounts
q = 1 / len(loader), which is exactly the sampler's rate.

FedProx's proximal term mu/2 ||w - w_global||^2 has the gradient mu (w - w_global), which
depends on no patient's data. It is added to the gradient *after* the DP step has clipped
and noised the per-sample gradients (a step pre-hook on the wrapped optimizer), so it never
enters a per-sample gradient and the clipping bound C still bounds each patient's influence:
a data-independent function of the private gradient and of public values (the broadcast
global weights) is post-processing and spends no privacy.
"""

from __future__ import annotations

import math
import secrets
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from dpseg.data import flatten_collate
from dpseg.federated.ledger import PrivacyLedger
from dpseg.federated.strategies import SiteUpdate, Weights, trainable_state
from dpseg.privacy.data_loader import DPDataLoader
from dpseg.privacy.sampling_plan import unit_name
from dpseg.privacy.secret import derive_seed, without_noise_seed

__all__ = ["ENGINES", "BudgetExhausted", "Site", "SiteConfig", "poisson_rate"]

ENGINES = ("dpseg", "opacus", "none")
OPTIMIZERS = ("adam", "sgd")


_TAG = 0x4E4F495345  # "NOISE": beyond any step a site takes (seeds apart from the steps')


class BudgetExhausted(RuntimeError):
    """The site's next round would spend more than its --max-epsilon; it stops training."""


def poisson_rate(
    num_examples: int, batch_size: int, sample_rate: float | None = None
) -> tuple[float, int]:
    """(q, steps per epoch): a declared q and round(1/q), public constants; or, without one,
    q = 1 / ceil(n / B) as Opacus derives it, which makes the site's n public."""
    if sample_rate is not None:
        return float(sample_rate), max(1, int(round(1 / sample_rate)))
    steps = max(1, math.ceil(num_examples / batch_size))
    return 1.0 / steps, steps


@dataclass
class SiteConfig:
    """Local training settings, the same at every site of a run."""

    engine: str = "dpseg"
    optimizer: str = "adam"
    lr: float = 1e-3
    momentum: float = 0.0
    batch_size: int = 4  # expected batch under Poisson sampling (patients)
    # A declared Poisson rate: with it q and the normaliser (batch_size) are public constants
    # and the site's epsilon is for add/remove; without it q reads the site's size (public:
    # replace-one). Each sampled patient brings items_per_patient patches.
    sample_rate: float | None = None
    items_per_patient: int = 1
    # What the ledger calls a site's declared unit; None: the dataset's own privacy_unit
    # attribute, else "patient" (dpseg.privacy.sampling_plan).
    privacy_unit: str | None = None
    poisson: bool = True  # False: shuffled fixed batches (only without DP)
    max_grad_norm: float = 1.0
    accountant: str = "prv"
    delta: float = 1e-5
    max_epsilon: float | None = None
    opacus_mode: str = "hooks"
    backend: str = "auto"  # dpseg fused-op backend
    device: str = "cpu"

    def __post_init__(self) -> None:
        if self.engine not in ENGINES:
            raise ValueError(f"unknown engine {self.engine!r}; use one of {ENGINES}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"unknown optimizer {self.optimizer!r}; use one of {OPTIMIZERS}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.engine != "none" and not self.poisson:
            raise ValueError("DP engines need Poisson sampling (the accountant assumes it)")
        if self.sample_rate is not None and not 0 < self.sample_rate <= 1:
            raise ValueError(f"sample_rate must be in (0, 1], got {self.sample_rate}")
        if self.items_per_patient < 1:
            raise ValueError(f"items_per_patient must be >= 1, got {self.items_per_patient}")
        if self.items_per_patient > 1 and self.engine == "opacus":
            raise ValueError(
                "items_per_patient > 1 needs engine 'dpseg' (or 'none'): Opacus clips each "
                "row alone, so a patient's k patches would move the update by k C"
            )


class Site:
    """One site. ``model_fn()`` builds a fresh model (the same init everywhere).

    ``secret`` keys the site's sampling and noise (see the module doc); without one the site
    draws a fresh secret from OS entropy, so two sites built alike draw different batches
    and noise. ``seed`` is public (the model's initialisation and the data split use it)."""

    def __init__(
        self,
        name: str,
        index: int,
        dataset: Dataset,
        model_fn: Callable[[], nn.Module],
        config: SiteConfig,
        *,
        noise_multiplier: float = 1.0,
        seed: int = 0,
        secret: int | None = None,
        loss_fn: nn.Module | None = None,
    ):
        if len(dataset) == 0:
            raise ValueError(f"site {name!r} has no training cases")
        self.name, self.index, self.dataset, self.config = name, index, dataset, config
        self.num_examples = len(dataset)
        self.noise_multiplier = float(noise_multiplier) if config.engine != "none" else 0.0
        self.device = torch.device(config.device)
        self.loss_fn = loss_fn if loss_fn is not None else _default_loss()
        self.exhausted: str | None = None  # the reason, once the budget is spent

        self.sample_rate, self.steps_per_epoch = poisson_rate(
            self.num_examples, config.batch_size, config.sample_rate
        )
        collate = flatten_collate if config.items_per_patient > 1 else None
        # The key of every random draw the site makes; kept out of state_dict().
        self._key = derive_seed(seed, secrets.randbits(63) if secret is None else secret, index)
        self.steps_taken = 0  # the next step's index in the key's stream
        # Both generators are reseeded from (key, step, stream 0-2) before each step's draw
        # (dpseg.train.loop.reseed_step); the Philox noise is keyed by (noise seed, step),
        # its seed drawn from the key under a tag that no step number reaches.
        self.loader_generator = torch.Generator().manual_seed(derive_seed(self._key, _TAG, 1))
        self.noise_generator = torch.Generator().manual_seed(derive_seed(self._key, _TAG, 2))
        noise_seed = derive_seed(self._key, _TAG, 3)
        if config.poisson:
            loader: DataLoader = DPDataLoader(
                dataset, self.sample_rate, self.steps_per_epoch, generator=self.loader_generator,
                collate_fn=collate,
            )  # fmt: skip
        else:
            loader = DataLoader(
                dataset, batch_size=config.batch_size, shuffle=True,
                generator=self.loader_generator, collate_fn=collate,
            )  # fmt: skip

        self.module = model_fn().to(self.device)  # the plain model: weights in and out
        params = [p for p in self.module.parameters() if p.requires_grad]
        if config.optimizer == "adam":
            base = torch.optim.Adam(params, lr=config.lr)
        else:
            base = torch.optim.SGD(params, lr=config.lr, momentum=config.momentum)
        self._prox: tuple[float, list[torch.Tensor]] | None = None
        base.register_step_pre_hook(self._add_proximal_gradient)
        self._params = params

        self.ledger: PrivacyLedger | None = None
        if config.engine == "dpseg":
            import dpseg

            engine = dpseg.PrivacyEngine(accountant=config.accountant)
            declared = {}
            if config.sample_rate is not None:  # the normaliser too: add/remove adjacency
                declared = {"expected_batch_size": config.batch_size}
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)  # the guarantee is in the report
                self.model, self.optimizer, self.loader = engine.make_private(
                    module=self.module, optimizer=base, data_loader=loader,
                    noise_multiplier=self.noise_multiplier, max_grad_norm=config.max_grad_norm,
                    poisson_sampling=True, noise_seed=noise_seed, backend=config.backend,
                    **self._unit_name(), **declared,
                )  # fmt: skip
            self.ledger = PrivacyLedger(
                engine.accountant, config.delta, name, unit=engine.guarantee.unit
            )
        elif config.engine == "opacus":
            self.model, self.optimizer, self.loader, accountant = self._opacus(base, loader)
            # Opacus clips rows: they are the declared units only if each has one row.
            ids = getattr(self.dataset, "patient_ids", None)
            one_each = ids is not None and len(set(ids)) == len(ids)
            unit = unit_name(self.dataset, self.config.privacy_unit) if one_each else "item"
            self.ledger = PrivacyLedger(accountant, config.delta, name, unit=unit)
        else:
            self.model, self.optimizer, self.loader = self.module, base, loader

    # --- engines -----------------------------------------------------------------------------
    def _unit_name(self) -> dict:
        """The configured name of the site's unit, where its dataset declares its units
        (PatchDataset: one a case); rows of a dataset that declares none are "item"s."""
        if getattr(self.dataset, "patient_ids", None) is None or not self.config.privacy_unit:
            return {}
        return {"privacy_unit": self.config.privacy_unit}

    def _opacus(self, base, loader):
        import opacus

        transposed = [
            m for m in self.module.modules() if isinstance(m, nn.modules.conv._ConvTransposeNd)
        ]
        if transposed and self.config.poisson:
            warnings.warn(
                f"site {self.name}: Opacus has no per-sample rule for "
                f"{type(transposed[0]).__name__} "
                "and computes it with functorch, which fails on an empty Poisson batch (that "
                "round then fails at this site). Build the U-Net with upsample='interp'.",
                stacklevel=3,
            )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "secure RNG turned off" etc., said in the docs
            engine = opacus.PrivacyEngine(accountant=self.config.accountant)
            model, optimizer, loader = engine.make_private(
                module=self.module, optimizer=base, data_loader=loader,
                noise_multiplier=self.noise_multiplier, max_grad_norm=self.config.max_grad_norm,
                poisson_sampling=False, grad_sample_mode=self.config.opacus_mode,
                noise_generator=self.noise_generator,
            )  # fmt: skip
        return model, optimizer, loader, engine.accountant

    @property
    def private(self) -> bool:
        return self.ledger is not None

    @property
    def weight(self) -> int:
        """The site's weight in FedAvg's mean: B / q, its size as its public Poisson sampling
        rate states it (its exact number of cases is not public; strategies.py). A site
        drawing fixed shuffled batches (non-private only) has no sampling rate and weights
        by its number of cases, as FedAvg does."""
        if not self.config.poisson:
            return self.num_examples
        return self.steps_per_epoch * self.config.batch_size

    @property
    def epsilon(self) -> float | None:
        return self.ledger.epsilon if self.ledger is not None else None

    # --- FedProx ---------------------------------------------------------------------------
    @torch.no_grad()
    def _add_proximal_gradient(self, optimizer, args, kwargs) -> None:
        if self._prox is None:
            return
        mu, anchors = self._prox
        for p, a in zip(self._params, anchors, strict=True):
            if p.grad is None:
                p.grad = mu * (p - a)
            else:
                p.grad.add_(p - a, alpha=mu)

    # --- one round ---------------------------------------------------------------------------
    def steps_for(self, local_steps: int | None = None, local_epochs: int | None = None) -> int:
        if local_epochs is not None:
            return local_epochs * self.steps_per_epoch
        if local_steps is None or local_steps < 1:
            raise ValueError("give local_steps >= 1 or local_epochs >= 1")
        return int(local_steps)

    def check_budget(self, steps: int) -> None:
        """Raise BudgetExhausted if ``steps`` more DP steps would pass --max-epsilon."""
        if self.exhausted:
            raise BudgetExhausted(self.exhausted)
        limit = self.config.max_epsilon
        if self.ledger is None or limit is None:
            return
        after = self.ledger.projected_epsilon(self.noise_multiplier, self.sample_rate, steps)
        if after > limit:
            self.exhausted = (
                f"privacy budget spent: epsilon {self.ledger.epsilon:.2f} of --max-epsilon "
                f"{limit:g}, and {steps} more steps would reach {after:.2f}; it stops training"
            )
            raise BudgetExhausted(self.exhausted)

    def load_weights(self, weights: Weights) -> None:
        self.module.load_state_dict(weights, strict=False)

    def fit(
        self,
        weights: Weights,
        local_steps: int,
        config: dict | None = None,
        on_step: Callable[[float], None] | None = None,
    ) -> SiteUpdate:
        """One round from the global ``weights``; returns the weight change and its cost."""
        config = config or {}
        self.check_budget(local_steps)
        self.load_weights(weights)
        # The round's learning rate (a server-side schedule); without one, the configured lr.
        lr = self.config.lr * float(config.get("lr_scale", 1.0))
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        mu = float(config.get("proximal_mu", 0.0))
        self._prox = (mu, [weights[k].to(self.device) for k in self._param_names()]) if mu else None
        self.model.train()
        start, cpu_start = time.perf_counter(), time.process_time()
        losses = self._train(local_steps, on_step)
        seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
        self._prox = None
        new = trainable_state(self.module)
        # Deltas travel on the CPU, as they would over the wire.
        delta = {k: (new[k] - weights[k].to(self.device)).cpu() for k in weights}
        return SiteUpdate(
            site=self.name, delta=delta, num_examples=self.num_examples, steps=local_steps,
            seconds=seconds, loss=float(np.mean(losses)) if losses else None,
            metrics={"cpu_seconds": cpu_seconds}, weight=float(self.weight),
        )  # fmt: skip

    def _param_names(self) -> list[str]:
        ids = {id(p): n for n, p in self.module.named_parameters()}
        return [ids[id(p)] for p in self._params]

    def _train(self, steps: int, on_step: Callable[[float], None] | None) -> list[float]:
        from dpseg.train.loop import local_train

        # Step t of the site is reseeded from (key, t): a resumed run, which knows t from
        # its state and the key from its secret, draws what the uninterrupted one would.
        start, self.steps_taken = self.steps_taken, self.steps_taken + steps
        # (counted before training: the steps of a round that fails midway are never
        # drawn again, though nothing of them left the site)
        with warnings.catch_warnings():
            # Opacus's hooks on the first layer, whose input needs no grad, make torch warn
            # at every backward; harmless, and it would flood the progress bar.
            warnings.filterwarnings("ignore", message="Full backward hook is firing")
            losses = local_train(
                self.model, self.optimizer, self.loader, self.loss_fn, steps, self.device,
                on_step=None if on_step is None else (lambda _step, loss, _n: on_step(loss)),
                seed=self._key, start_step=start,
            )  # fmt: skip
        return [v for v in losses if not math.isnan(v)]  # NaN: an empty Poisson batch

    # --- state ---------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Everything a resumed site needs but its secret: no generator state, no noise seed
        (the module doc)."""
        return {
            "name": self.name,
            "engine": self.config.engine,
            "config": asdict(self.config),
            "noise_multiplier": self.noise_multiplier,
            "model": {k: v.detach().cpu().clone() for k, v in self.module.state_dict().items()},
            "optimizer": without_noise_seed(self.optimizer.state_dict()),
            "ledger": self.ledger.state_dict() if self.ledger is not None else None,
            "steps_taken": self.steps_taken,
            "exhausted": self.exhausted,
        }

    def load_state_dict(self, state: dict) -> None:
        if state["engine"] != self.config.engine:
            raise ValueError(
                f"site {self.name}: checkpoint trained with engine {state['engine']!r}, "
                f"this run uses {self.config.engine!r}"
            )
        self.module.load_state_dict(state["model"])
        # A state written before the secret keyed the noise holds a seed derived from the
        # public --seed: the one this site derived from its secret stays.
        self.optimizer.load_state_dict(without_noise_seed(state["optimizer"]))
        if self.ledger is not None and state["ledger"] is not None:
            self.ledger.load_state_dict(state["ledger"])
        if "steps_taken" in state:
            self.steps_taken = int(state["steps_taken"])
        else:  # written before the step count: go on past every step the ledger counts
            self.steps_taken = self.ledger.steps if self.ledger is not None else 0
        self.exhausted = state["exhausted"]


def _default_loss() -> nn.Module:
    from dpseg.train.losses import DiceCELoss

    return DiceCELoss()
