"""Server strategies against hand computations (numpy, float64)."""

import numpy as np
import pytest
import torch

from dpseg.federated.strategies import (
    ClientLevelDP,
    FedAdam,
    FedAvg,
    FedProx,
    FedYogi,
    SiteUpdate,
    make_strategy,
    update_norm,
)


def _upd(name, n, **arrays):
    return SiteUpdate(name, {k: torch.tensor(v, dtype=torch.float64) for k, v in arrays.items()}, n)


W = {
    "a": torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64),
    "b": torch.tensor([[3.0]], dtype=torch.float64),
}


def _rounds():
    # Two rounds of updates from three sites of different sizes.
    return [
        [_upd("s0", 2, a=[0.1, 0.2, -0.3], b=[[1.0]]), _upd("s1", 6, a=[-0.5, 0.0, 0.1], b=[[0.0]]),
         _upd("s2", 4, a=[0.0, 0.3, 0.3], b=[[-2.0]])],
        [_upd("s0", 2, a=[0.2, -0.1, 0.0], b=[[0.5]]),
         _upd("s2", 4, a=[-0.1, -0.1, 0.4], b=[[0.1]])],
    ]  # fmt: skip


def _weighted_mean(updates):
    n = np.array([u.num_examples for u in updates], float)
    return {
        k: sum(w * u.delta[k].numpy() for w, u in zip(n / n.sum(), updates, strict=True)) for k in W
    }


def test_fedavg_is_example_weighted_mean_of_site_weights():
    s = FedAvg()
    ups = _rounds()[0]
    new = s.aggregate(W, ups)
    # The same thing as the weighted mean of the sites' weights w + delta_k.
    n = np.array([2, 6, 4], float) / 12
    for k in W:
        want = sum(w * (W[k].numpy() + u.delta[k].numpy()) for w, u in zip(n, ups, strict=True))
        np.testing.assert_allclose(new[k].numpy(), want, rtol=0, atol=1e-15)
    assert s.aggregate(W, [])["a"].equal(W["a"])  # no update: unchanged


def test_fedprox_sends_mu_and_averages_like_fedavg():
    p = FedProx(mu=0.3)
    assert p.configure_fit(1) == {"proximal_mu": 0.3}
    ups = _rounds()[0]
    for k, v in p.aggregate(W, ups).items():
        assert torch.equal(v, FedAvg().aggregate(W, ups)[k])


@pytest.mark.parametrize("cls", [FedAdam, FedYogi])
def test_fedadam_fedyogi_match_hand_computation(cls):
    eta, b1, b2, tau = 0.05, 0.9, 0.99, 1e-3
    s = cls(server_lr=eta, beta1=b1, beta2=b2, tau=tau)
    w = {k: v.numpy().copy() for k, v in W.items()}
    m = {k: np.zeros_like(v) for k, v in w.items()}
    v2 = {k: np.full_like(v, tau**2) for k, v in w.items()}
    cur = dict(W)
    for ups in _rounds():
        d = _weighted_mean(ups)
        for k in w:
            m[k] = b1 * m[k] + (1 - b1) * d[k]
            if cls is FedAdam:
                v2[k] = b2 * v2[k] + (1 - b2) * d[k] ** 2
            else:
                v2[k] = v2[k] - (1 - b2) * d[k] ** 2 * np.sign(v2[k] - d[k] ** 2)
            w[k] = w[k] + eta * m[k] / (np.sqrt(v2[k]) + tau)
        cur = s.aggregate(cur, ups)
        for k in w:
            np.testing.assert_allclose(cur[k].numpy(), w[k], rtol=1e-12, atol=1e-14)
    # The server state is what a checkpoint carries: a fresh strategy resumes identically.
    t = cls(server_lr=eta, beta1=b1, beta2=b2, tau=tau)
    t.load_state_dict(s.state_dict())
    extra = [_upd("s1", 3, a=[0.3, 0.3, 0.3], b=[[0.3]])]
    a, b = s.aggregate(cur, extra), t.aggregate(cur, extra)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_client_level_dp_clips_and_uses_fixed_denominator():
    ups = _rounds()[0]
    clip = 0.6
    s = ClientLevelDP(FedAvg(), clip=clip, noise_multiplier=0.0, expected_sites=2.5)
    new = s.aggregate(W, ups)
    want = {k: np.zeros_like(v.numpy()) for k, v in W.items()}
    for u in ups:
        f = min(1.0, clip / update_norm(u.delta))
        for k in W:
            want[k] += f * u.delta[k].numpy()
    for k in W:
        np.testing.assert_allclose(new[k].numpy(), W[k].numpy() + want[k] / 2.5, atol=1e-12)
    assert sorted(s.last_clipped) == ["s0", "s2"]  # norms 1.07 and 2.04; s1 has 0.51


def test_client_level_dp_noise_std_and_state():
    s = ClientLevelDP(FedAvg(), clip=2.0, noise_multiplier=1.5, expected_sites=3.0, seed=4)
    zero = {"a": torch.zeros(20000, dtype=torch.float64)}
    state = s.state_dict()
    s.configure_fit(1)
    out = s.aggregate(zero, [])["a"]  # nobody reported: the server still releases noise
    assert out.std().item() == pytest.approx(1.5 * 2.0 / 3.0, rel=0.03)
    s.configure_fit(2)
    assert not torch.equal(s.aggregate(zero, [])["a"], out)  # each round its own noise
    # Round r's noise is a function of (seed, r): a resumed server draws it again, and its
    # state holds no generator to replay it from.
    s.load_state_dict(state)
    s.configure_fit(1)
    assert torch.equal(s.aggregate(zero, [])["a"], out)
    assert "generator" not in state
    other = ClientLevelDP(FedAvg(), clip=2.0, noise_multiplier=1.5, expected_sites=3.0, seed=5)
    other.configure_fit(1)
    assert not torch.equal(other.aggregate(zero, [])["a"], out)


def test_make_strategy_defaults_and_errors():
    assert make_strategy("fedavg").server_lr == 1.0
    assert make_strategy("fedadam").server_lr == 1e-2
    assert isinstance(make_strategy("fedyogi", tau=1e-2), FedYogi)
    with pytest.raises(ValueError, match="unknown strategy"):
        make_strategy("fedsgd")
