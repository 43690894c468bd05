"""What the server accepts (dpseg/federated/update_checks.py), in the in-process simulator:
a NaN site and a 1000x site are refused and the model is the run without their updates; a
non-finite aggregate refuses the round and keeps the model and the strategy's moments; the
SecAgg+ sum checks; the settings SecAgg+ cannot protect are refused; and the quantisation
bound that tests/test_flower_sealed.py holds SecAgg+ to, checked against Flower's own
quantise/dequantise arithmetic."""

import copy
import re

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from dpseg.federated.runner import FederatedConfig, SetupError, run_federation
from dpseg.federated.simulator import Simulator
from dpseg.federated.site import Site, SiteConfig
from dpseg.federated.strategies import FedAdam, FedAvg
from dpseg.federated.update_checks import check_secure_sum, check_update

T = {"w": torch.tensor([[1.0, -2.0], [0.5, 3.0]]), "b": torch.tensor([0.1, 0.2])}


def _delta(scale=1.0, **override):
    d = {"w": torch.full((2, 2), 0.01 * scale), "b": torch.full((2,), -0.02 * scale)}
    d.update(override)
    return d


@pytest.mark.parametrize(
    "delta, why",
    [
        (_delta(w=torch.tensor([[0.0, float("nan")], [0.0, 0.0]])), "non-finite values in ['w']"),
        (_delta(b=torch.tensor([float("inf"), 0.0])), "non-finite values in ['b']"),
        (_delta(w=torch.zeros(4)), "w is torch.float32 (4,), the model's is torch.float32 (2, 2)"),
        (_delta(b=torch.zeros(2, dtype=torch.float64)), "b is torch.float64 (2,)"),
        ({"w": torch.zeros(2, 2)}, "missing ['b']"),
        ({**_delta(), "extra": torch.zeros(1)}, "unknown ['extra']"),
        (_delta(1000.0), "update norm 34.64 above --max-update-norm 1"),
    ],
)
def test_check_update_refuses_with_the_reason(delta, why):
    assert why in check_update(delta, T, max_norm=1.0)


def test_check_update_accepts_a_sound_update_and_measures_huge_norms_in_float64():
    assert check_update(_delta(), T, max_norm=1.0) is None
    assert check_update(_delta(1000.0), T) is None  # no cap: any finite norm
    # float32 squares of 1e20 overflow; the check must not call that norm inf.
    huge = _delta(w=torch.full((2, 2), 1e20))
    assert "update norm 2e+20 above" in check_update(huge, T, max_norm=1.0)


def _mlp():
    torch.manual_seed(11)
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1))


class _Hostile(Site):
    """A site whose update is replaced after training (a broken or malicious hospital)."""

    def __init__(self, *a, tamper, **kw):
        super().__init__(*a, **kw)
        self.tamper = tamper

    def fit(self, weights, local_steps, config=None, on_step=None):
        update = super().fit(weights, local_steps, config, on_step)
        update.delta = self.tamper(update.delta)
        return update


def _sites(tampers):
    cfg = SiteConfig(engine="none", optimizer="sgd", lr=0.1, batch_size=4, poisson=False)
    g = torch.Generator().manual_seed(5)
    out = []
    for k, tamper in enumerate(tampers):
        data = TensorDataset(torch.randn(4 + k, 3, generator=g), torch.randn(4 + k, 1, generator=g))
        cls, kw = (_Hostile, {"tamper": tamper}) if tamper else (Site, {})
        out.append(cls(f"s{k}", k, data, _mlp, cfg, loss_fn=nn.MSELoss(), **kw))
    return out


def _nan(delta):
    delta = {k: v.clone() for k, v in delta.items()}
    delta["0.weight"][0, 0] = float("nan")
    return delta


def test_a_nan_site_and_a_1000x_site_are_refused_and_the_model_is_the_run_without_them():
    sites = _sites([None, _nan, lambda d: {k: 1000 * v for k, v in d.items()}])
    twin = copy.deepcopy(sites[0])  # what the honest site contributes, on a copy
    sim = Simulator(sites, _mlp(), FedAvg(), local_steps=1, max_update_norm=1.0)
    before = {k: v.clone() for k, v in sim.weights.items()}
    honest = twin.fit(before, 1)
    assert 0 < sum(float(v.norm() ** 2) for v in honest.delta.values()) ** 0.5 < 1.0
    rec = sim.run_round()
    want = FedAvg().aggregate(before, [honest])
    assert all(torch.equal(sim.weights[k], want[k]) for k in want)  # bit for bit
    assert rec["took_part"] == ["s0"]
    assert [r["site"] for r in rec["refused"]] == ["s1", "s2"]
    assert rec["refused"][0]["reason"] == "non-finite values in ['0.weight']"
    assert rec["sites"]["s1"]["status"] == rec["sites"]["s2"]["status"] == "refused"
    assert "above --max-update-norm 1" in rec["sites"]["s2"]["refused"]


def test_without_a_cap_a_1000x_site_is_averaged_but_nan_never_is():
    sim = Simulator(_sites([None, _nan, lambda d: {k: 1000 * v for k, v in d.items()}]), _mlp(),
                    FedAvg(), local_steps=1)  # fmt: skip
    rec = sim.run_round()
    assert rec["took_part"] == ["s0", "s2"] and [r["site"] for r in rec["refused"]] == ["s1"]
    assert all(bool(torch.isfinite(v).all()) for v in sim.weights.values())


def test_a_non_finite_aggregate_refuses_the_round_and_keeps_model_and_moments():
    # A finite update, but a server step of 1e39 overflows float32: the model would be inf.
    sites = _sites([None, None])
    strategy = FedAdam(server_lr=1e39)
    sim = Simulator(sites, _mlp(), strategy, local_steps=1)
    before = {k: v.clone() for k, v in sim.weights.items()}
    rec = sim.run_round()
    assert "the new global model is not finite" in rec["refused_round"]
    assert all(torch.equal(sim.weights[k], before[k]) for k in before)
    assert strategy.m is None and strategy.v is None  # the moments as before the round
    strategy.server_lr = 1e-2  # a sane step: the next round trains as if nothing happened
    assert "refused_round" not in sim.run_round() and strategy.m is not None


def test_the_secure_sum_is_held_to_what_n_honest_sites_can_send():
    ok = {"w": torch.full((2, 2), 2.9), "b": torch.zeros(2)}
    assert check_secure_sum(ok, n=3, clip_range=1.0, max_norm=10.0) is None
    nan = {**ok, "b": torch.tensor([float("nan"), 0.0])}
    assert "not finite" in check_secure_sum(nan, 3, 1.0)
    far = {**ok, "b": torch.tensor([3.5, 0.0])}
    assert "beyond 3 sites x --secagg-clip-range 1" in check_secure_sum(far, 3, 1.0)
    assert "beyond 3 sites x --max-update-norm 1" in check_secure_sum(ok, 3, 1.0, max_norm=1.0)


TINY = dict(phantoms=12, sites=3, size=16, patch=16, channels=(4, 8), local_steps=2,
            batch_size=2, accountant="rdp", rounds=1, seed=3)  # fmt: skip


@pytest.mark.parametrize(
    "settings, num_sites, why",
    [
        ({"client_clip": 1.0}, 3, "under SecAgg+ the server never sees a site's update"),
        ({}, 2, "--secagg with 2 site(s) a round"),
        ({"fraction": 0.5}, 4, "--secagg with 2 site(s) a round"),
        ({"secagg_bits": 30}, 4, "lower --secagg-bits to 29 or less"),
    ],
)
def test_what_secagg_cannot_protect_is_refused(settings, num_sites, why):
    cfg = FederatedConfig(**TINY, secagg=True, **settings)
    with pytest.raises(ValueError, match=re.escape(why)):
        cfg.check()
        cfg.check_secagg(num_sites)


def test_secagg_is_refused_in_process(tmp_path):
    with pytest.raises(SetupError, match="--secagg needs --runtime flower"):
        run_federation(FederatedConfig(**TINY, secagg=True), tmp_path, progress=False)


def test_the_quantisation_bound_holds_for_flowers_arithmetic():
    """Each site's x_k through Flower's quantize (stochastic rounding), the modular sum, and
    the workflow's dequantise/offset/ratio: off from sum x_k / n by less than
    max_error * sum w / (n W) in every coordinate (secagg.max_error's derivation; the masks
    cancel exactly modulo 2^32 and are left out)."""
    pytest.importorskip("flwr")
    from flwr.common.secure_aggregation.ndarrays_arithmetic import (
        factor_combine,
        factor_extract,
        parameters_addition,
        parameters_mod,
    )
    from flwr.common.secure_aggregation.quantization import dequantize, quantize

    from dpseg.federated.flower.secagg import MODULUS, max_error

    rng = np.random.default_rng(0)
    c, bits, n = 0.5, 22, 3
    worst = 0.0
    for _ in range(20):
        x = [rng.uniform(-c, c, size=(257,)) for _ in range(n)]
        total = None
        for xk in x:
            q = factor_combine(2**bits, quantize([xk], c, 2**bits))  # weight slot 1 (= 2^bits)
            q = [a.astype(np.int64) for a in q]  # as the int64 masks make them
            total = q if total is None else parameters_addition(total, q)
        total = parameters_mod(total, MODULUS)
        ratio, rest = factor_extract(total)
        mean = dequantize(rest, c, 2**bits)[0]
        mean = (mean - (n - 1) * c) * (2**bits / ratio)
        worst = max(worst, float(np.abs(mean * n - sum(x)).max()))
    bound = max_error(n, c, bits, max_weight=1.0, weight_sum=1.0)  # the sum's bound
    assert 0 < worst < bound
    assert worst > bound / 20  # and not far from it: stochastic rounding uses the steps


@pytest.mark.parametrize(
    "flags, why",
    [
        (["--secagg"], "--secagg needs --runtime flower"),
        (["--tls"], "--tls: for --runtime flower"),
        (["--share-site-stats"], "--share-site-stats: for --runtime flower"),
        (["--runtime", "flower", "--secagg", "--client-clip", "1"], "Drop --client-clip"),
    ],
)
def test_the_cli_says_what_to_change(tmp_path, capsys, flags, why):
    from dpseg.cli import main

    args = ["federate", "--phantoms", "8", "--sites", "2", "--out", str(tmp_path / "r"), *flags]
    assert main(args) == 2
    assert why in capsys.readouterr().err
    assert not (tmp_path / "r" / "phantoms").exists()  # refused before any work
