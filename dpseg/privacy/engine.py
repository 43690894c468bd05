"""PrivacyEngine: the Opacus-shaped entry point (same call names and argument meanings)."""

from __future__ import annotations

import warnings

import torch
from opacus.accountants import PRVAccountant, RDPAccountant
from opacus.accountants.utils import get_noise_multiplier
from torch import nn
from torch.optim import Optimizer
from torch.utils.data import DataLoader

from dpseg import ops
from dpseg.privacy.capture import capture_layers, release_layers
from dpseg.privacy.data_loader import DPDataLoader
from dpseg.privacy.optimizer import DPOptimizer
from dpseg.privacy.validate import validate

ACCOUNTANTS = {"prv": PRVAccountant, "rdp": RDPAccountant}
BACKENDS = ("auto", "torch", "cpp", "triton", "cuda")
LOSS_REDUCTIONS = ("mean", "sum")


class PrivateModule(nn.Module):
    """The user's model with per-sample capture installed (``_module`` is the original, as in
    Opacus's GradSampleModule, so state_dict keys carry the ``_module.`` prefix)."""

    def __init__(
        self, module: nn.Module, allow_fallback: bool = True, conv_strategy: str | None = None
    ):
        super().__init__()
        self._module = module
        self._layers = capture_layers(
            module, allow_fallback=allow_fallback, conv_strategy=conv_strategy
        )

    def forward(self, *args, **kwargs):
        return self._module(*args, **kwargs)

    def release(self) -> nn.Module:
        """Removes the capture and returns the plain model (for export or evaluation)."""
        release_layers(self._layers)
        self._layers = []
        return self._module


class PrivacyEngine:
    def __init__(self, accountant: str = "prv", secure_mode: bool = False):
        if accountant not in ACCOUNTANTS:
            raise ValueError(f"unknown accountant {accountant!r}; use one of {sorted(ACCOUNTANTS)}")
        self.accountant = ACCOUNTANTS[accountant]()
        self.accountant_name = accountant
        self.secure_mode = secure_mode
        self.sample_rate: float | None = None
        if secure_mode:
            warnings.warn(
                "secure_mode: noise seeds and Poisson sampling draw from the OS entropy "
                "source and each noise value sums 4 Gaussians (Opacus's defence against the "
                "floating-point attack); runs are not reproducible.",
                stacklevel=2,
            )

    def _check(self, noise_multiplier, max_grad_norm, loss_reduction, backend, noise_seed):
        if not max_grad_norm > 0:
            raise ValueError(
                f"max_grad_norm must be > 0 (the clipping bound C), got {max_grad_norm}"
            )
        if not noise_multiplier >= 0:
            raise ValueError(f"noise_multiplier must be >= 0, got {noise_multiplier}")
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
    ) -> tuple[PrivateModule, DPOptimizer, DataLoader]:
        """Returns (module, optimizer, data_loader) ready for an ordinary training loop."""
        self._check(noise_multiplier, max_grad_norm, loss_reduction, backend, noise_seed)
        if not batch_first:
            raise ValueError("dpseg needs the batch in dimension 0 (batch_first=True)")
        if clipping != "flat":
            raise ValueError(f"clipping={clipping!r}: dpseg implements flat clipping only")
        if isinstance(module, PrivateModule):
            raise ValueError("this module was already made private; pass the original model")
        validate(module)
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
        dataset_size = len(data_loader.dataset)
        if dataset_size == 0:
            raise ValueError("the data loader's dataset is empty")
        if len(data_loader) == 0:
            raise ValueError(
                "the data loader yields no batches (a batch larger than the dataset "
                "with drop_last=True?)"
            )
        self.sample_rate = 1 / len(data_loader)
        expected_batch_size = max(1, int(dataset_size * self.sample_rate))
        if poisson_sampling:
            generator = None
            if noise_seed is not None:
                generator = torch.Generator().manual_seed(noise_seed)
            data_loader = DPDataLoader.from_data_loader(
                data_loader, generator=generator, secure=self.secure_mode
            )
        # backend="triton" means Triton end to end: the per-sample conv kernel too.
        conv_strategy = "triton" if backend == "triton" else None
        private = PrivateModule(module, allow_fallback=allow_fallback, conv_strategy=conv_strategy)
        dp_optimizer = DPOptimizer(
            optimizer,
            noise_multiplier=noise_multiplier,
            max_grad_norm=max_grad_norm,
            expected_batch_size=expected_batch_size,
            loss_reduction=loss_reduction,
            backend=backend,
            noise_seed=noise_seed,
            secure_mode=self.secure_mode,
        )
        sample_rate = self.sample_rate
        dp_optimizer.step_hook = lambda opt: self.accountant.step(
            noise_multiplier=opt.noise_multiplier, sample_rate=sample_rate
        )
        return private, dp_optimizer, data_loader

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
    ) -> tuple[PrivateModule, DPOptimizer, DataLoader]:
        """Finds the smallest noise multiplier that spends ``target_epsilon`` in ``epochs``."""
        if not target_epsilon > 0:
            raise ValueError(f"target_epsilon must be > 0, got {target_epsilon}")
        if not 0 < target_delta < 1:
            raise ValueError(f"target_delta must be in (0, 1), got {target_delta}")
        if not epochs >= 1:
            raise ValueError(f"epochs must be >= 1, got {epochs}")
        sigma = get_noise_multiplier(
            target_epsilon=target_epsilon,
            target_delta=target_delta,
            sample_rate=1 / len(data_loader),
            epochs=epochs,
            accountant=self.accountant.mechanism(),
            epsilon_tolerance=epsilon_tolerance,
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
        if not 0 < delta < 1:
            raise ValueError(f"delta must be in (0, 1), got {delta}")
        if len(self.accountant) == 0:
            return 0.0
        return float(self.accountant.get_epsilon(delta=delta))

    # A resumed run must keep its ledger: epsilon never resets.
    def state_dict(self) -> dict:
        return {"accountant": self.accountant_name, "history": list(self.accountant.history)}

    def load_state_dict(self, state: dict) -> None:
        if state.get("accountant") != self.accountant_name:
            raise ValueError(
                f"checkpoint was accounted with {state.get('accountant')!r}, this engine uses "
                f"{self.accountant_name!r}; create "
                f"PrivacyEngine(accountant={state.get('accountant')!r})"
            )
        self.accountant.history = [tuple(h) for h in state["history"]]
