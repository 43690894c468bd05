"""Server strategies: how the sites' updates become the next global model.

Sites send ``delta_k = w_k - w`` (their weights after local training minus the global
weights they started from). Every strategy first combines the deltas into one
pseudo-gradient and then takes a server step with it::

    combine:  delta = sum_k n_k delta_k / sum_k n_k          (n_k = site k's weight, below)
    FedAvg:   w <- w + eta * delta                          (eta = 1: the weighted mean of w_k)
    FedProx:  as FedAvg; each site adds mu/2 ||w_k - w||^2 to its local objective
    FedAdam:  m <- b1 m + (1-b1) delta;  v <- b2 v + (1-b2) delta^2
              w <- w + eta m / (sqrt(v) + tau)
    FedYogi:  as FedAdam but v <- v - (1-b2) delta^2 sign(v - delta^2)

The weight n_k is public: B / q_k = B ceil(cases_k / B), the site's size as its Poisson
sampling rate q_k and the expected batch B state it (``Site.weight``). Its exact number of
training cases would be a figure of its patients released without noise (adding one patient
changes it), and DP-SGD's accounting already declares q_k public.

FedAdam/FedYogi follow Reddi et al., "Adaptive Federated Optimization" (ICLR 2021),
Algorithm 2: m starts at 0 and v at tau^2, no bias correction. Their defaults here
(eta 1e-2, b1 0.9, b2 0.99, tau 1e-3) are the paper's suggested ranges; Flower's FedAdam
adds bias correction and uses tau 1e-9, which with v near 0 makes the first server step
eta * sign(delta) on every weight, too large for a U-Net's conv kernels.

``ClientLevelDP`` wraps any strategy for user-level (here: hospital-level) DP as in
McMahan et al., "Learning Differentially Private Recurrent Language Models" (2018): each
delta_k is clipped to norm S, the clipped deltas are summed and divided by the *expected*
number of sampled sites (a fixed denominator, so one site moves the mean by at most S/m),
and Gaussian noise of std z S / m is added before the inner strategy's server step. The
simulator samples sites by Poisson sampling at rate q for it, and the round is one step
(z, q) of an Opacus accountant.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from dpseg.privacy.secret import derive_seed

__all__ = [
    "STRATEGIES",
    "ClientLevelDP",
    "FedAdam",
    "FedAvg",
    "FedProx",
    "FedYogi",
    "SiteUpdate",
    "Strategy",
    "Weights",
    "make_strategy",
    "trainable_state",
    "update_norm",
]

Weights = dict[str, torch.Tensor]
STRATEGIES = ("fedavg", "fedprox", "fedadam", "fedyogi")


def trainable_state(module: torch.nn.Module) -> Weights:
    """Detached copies of the floating-point entries of a state_dict (what is averaged)."""
    return {k: v.detach().clone() for k, v in module.state_dict().items() if v.is_floating_point()}


def update_norm(delta: Weights) -> float:
    return float(torch.sqrt(sum((d.double() ** 2).sum() for d in delta.values())) if delta else 0.0)


@dataclass
class SiteUpdate:
    """What a site returns after one round of local training."""

    site: str
    delta: Weights
    num_examples: int
    steps: int = 0
    seconds: float = 0.0
    loss: float | None = None
    epsilon: float | None = None
    metrics: dict = field(default_factory=dict)
    weight: float | None = None  # its weight in the mean; None: num_examples

    def __post_init__(self) -> None:
        if self.weight is None:
            self.weight = float(self.num_examples)


class Strategy:
    """Base: the example-weighted mean of the deltas and a plain server step."""

    name = "base"

    def __init__(self, server_lr: float = 1.0):
        if not server_lr > 0:
            raise ValueError(f"server_lr must be > 0, got {server_lr}")
        self.server_lr = float(server_lr)

    def configure_fit(self, server_round: int) -> dict:
        """Settings sent to the sites with the global weights (Flower's fit config)."""
        return {}

    def combine(self, updates: list[SiteUpdate]) -> Weights:
        if not updates:
            raise ValueError("combine needs at least one update")
        total = float(sum(u.weight for u in updates))
        if not total > 0:
            raise ValueError("the updates carry no weight to average them by")
        out = {k: torch.zeros_like(v) for k, v in updates[0].delta.items()}
        for u in updates:
            w = u.weight / total
            for k, d in u.delta.items():
                out[k].add_(d, alpha=w)
        return out

    def apply(self, weights: Weights, delta: Weights) -> Weights:
        return {k: weights[k] + self.server_lr * delta[k] for k in weights}

    def aggregate(self, weights: Weights, updates: list[SiteUpdate]) -> Weights:
        """The next global weights; with no updates the model stays as it is."""
        if not updates:
            return {k: v.clone() for k, v in weights.items()}
        return self.apply(weights, self.combine(updates))

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    def __repr__(self) -> str:
        return f"{type(self).__name__}(server_lr={self.server_lr})"


class FedAvg(Strategy):
    name = "fedavg"


class FedProx(FedAvg):
    """FedAvg aggregation; the proximal term lives in the sites' local step (see site.py)."""

    name = "fedprox"

    def __init__(self, mu: float = 0.01, server_lr: float = 1.0):
        super().__init__(server_lr)
        if not mu >= 0:
            raise ValueError(f"FedProx mu must be >= 0, got {mu}")
        self.mu = float(mu)

    def configure_fit(self, server_round: int) -> dict:
        return {"proximal_mu": self.mu}

    def __repr__(self) -> str:
        return f"FedProx(mu={self.mu}, server_lr={self.server_lr})"


class FedAdam(Strategy):
    name = "fedadam"

    def __init__(
        self, server_lr: float = 1e-2, beta1: float = 0.9, beta2: float = 0.99, tau: float = 1e-3
    ):
        super().__init__(server_lr)
        if not (0 <= beta1 < 1 and 0 <= beta2 < 1):
            raise ValueError(f"betas must be in [0, 1), got {beta1}, {beta2}")
        if not tau > 0:
            raise ValueError(f"tau must be > 0, got {tau}")
        self.beta1, self.beta2, self.tau = float(beta1), float(beta2), float(tau)
        self.m: Weights | None = None
        self.v: Weights | None = None

    def _second_moment(self, v: torch.Tensor, d2: torch.Tensor) -> torch.Tensor:
        return self.beta2 * v + (1 - self.beta2) * d2

    def apply(self, weights: Weights, delta: Weights) -> Weights:
        if self.m is None or self.v is None:
            self.m = {k: torch.zeros_like(d) for k, d in delta.items()}
            self.v = {k: torch.full_like(d, self.tau**2) for k, d in delta.items()}
        out = {}
        for k, w in weights.items():
            d = delta[k]
            self.m[k] = self.beta1 * self.m[k] + (1 - self.beta1) * d
            self.v[k] = self._second_moment(self.v[k], d * d)
            out[k] = w + self.server_lr * self.m[k] / (self.v[k].sqrt() + self.tau)
        return out

    def state_dict(self) -> dict:
        def copy(d):
            return None if d is None else {k: t.clone() for k, t in d.items()}

        return {"m": copy(self.m), "v": copy(self.v)}

    def load_state_dict(self, state: dict) -> None:
        m, v = state.get("m"), state.get("v")
        self.m = None if m is None else {k: t.clone() for k, t in m.items()}
        self.v = None if v is None else {k: t.clone() for k, t in v.items()}

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(server_lr={self.server_lr}, beta1={self.beta1}, "
            f"beta2={self.beta2}, tau={self.tau})"
        )


class FedYogi(FedAdam):
    name = "fedyogi"

    def _second_moment(self, v: torch.Tensor, d2: torch.Tensor) -> torch.Tensor:
        # Yogi: v moves towards delta^2 by an additive, not multiplicative, amount.
        return v - (1 - self.beta2) * d2 * torch.sign(v - d2)


class ClientLevelDP(Strategy):
    """Hospital-level DP around another strategy (fixed clipping S, noise z at the server)."""

    def __init__(
        self,
        inner: Strategy,
        clip: float,
        noise_multiplier: float,
        expected_sites: float,
        seed: int = 0,
    ):
        super().__init__(inner.server_lr)
        if not clip > 0:
            raise ValueError(f"client-level clip must be > 0, got {clip}")
        if not noise_multiplier >= 0:
            raise ValueError(f"client-level noise multiplier must be >= 0, got {noise_multiplier}")
        if not expected_sites > 0:
            raise ValueError(f"expected sites per round must be > 0, got {expected_sites}")
        self.inner, self.clip, self.noise_multiplier = inner, float(clip), float(noise_multiplier)
        self.expected_sites = float(expected_sites)
        self.name = inner.name
        # Round r's noise is drawn from (seed, r) (configure_fit reseeds): a resumed run
        # draws what the uninterrupted one would, and no generator state is saved. The
        # seed must be secret (the simulator derives it from the server's secret).
        self.seed = int(seed)
        self.generator = torch.Generator().manual_seed(self.seed)
        self.last_clipped: list[str] = []

    def configure_fit(self, server_round: int) -> dict:
        self.generator.manual_seed(derive_seed(self.seed, server_round))
        return self.inner.configure_fit(server_round)

    def combine(self, updates: list[SiteUpdate], template: Weights | None = None) -> Weights:
        ref = updates[0].delta if updates else template
        if ref is None:
            raise ValueError("ClientLevelDP.combine needs a template when no site reported")
        total = {k: torch.zeros_like(v) for k, v in ref.items()}
        self.last_clipped = []
        for u in updates:
            factor = min(1.0, self.clip / (update_norm(u.delta) + 1e-12))
            if factor < 1.0:
                self.last_clipped.append(u.site)
            for k, d in u.delta.items():
                total[k].add_(d, alpha=factor)
        std = self.noise_multiplier * self.clip
        for t in total.values():
            noise = torch.normal(0.0, std, t.shape, generator=self.generator, dtype=t.dtype)
            t.add_(noise).div_(self.expected_sites)
        return total

    def aggregate(self, weights: Weights, updates: list[SiteUpdate]) -> Weights:
        # Noise is added even when no site reported: the release happens every round.
        return self.inner.apply(weights, self.combine(updates, template=weights))

    def apply(self, weights: Weights, delta: Weights) -> Weights:
        return self.inner.apply(weights, delta)

    def state_dict(self) -> dict:
        return {"inner": self.inner.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.inner.load_state_dict(state["inner"])  # (an older state's generator: ignored)

    def __repr__(self) -> str:
        return (
            f"ClientLevelDP({self.inner!r}, clip={self.clip}, z={self.noise_multiplier}, "
            f"m={self.expected_sites})"
        )


def make_strategy(
    name: str,
    *,
    mu: float = 0.01,
    server_lr: float | None = None,
    beta1: float = 0.9,
    beta2: float = 0.99,
    tau: float = 1e-3,
) -> Strategy:
    if name == "fedavg":
        return FedAvg(server_lr if server_lr is not None else 1.0)
    if name == "fedprox":
        return FedProx(mu, server_lr if server_lr is not None else 1.0)
    if name in ("fedadam", "fedyogi"):
        cls = FedAdam if name == "fedadam" else FedYogi
        return cls(server_lr if server_lr is not None else 1e-2, beta1, beta2, tau)
    raise ValueError(f"unknown strategy {name!r}; use one of {STRATEGIES}")
