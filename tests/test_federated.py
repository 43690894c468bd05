"""The federated simulator: FedAvg = centralized SGD, ledgers, faults, budgets, FedProx under DP.

Synthetic tensors and tiny models here (tests/test_federated_cli.py runs the U-Net workload).
"""

import copy
import math

import pytest
import torch
from opacus.accountants import PRVAccountant, RDPAccountant
from torch import nn
from torch.utils.data import Dataset, TensorDataset

from dpseg.federated.simulator import Simulator
from dpseg.federated.site import BudgetExhausted, Site, SiteConfig, poisson_rate
from dpseg.federated.strategies import FedAvg, FedProx, trainable_state
from dpseg.privacy.secret import derive_seed, site_secret


def _mlp():
    torch.manual_seed(123)
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 1)).double()


def _data(n, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 5, generator=g, dtype=torch.float64), torch.randn(
        n, 1, generator=g, dtype=torch.float64
    )


def _mse(out, y):
    return ((out - y) ** 2).mean()


def _conv_net():
    # Small enough for a fast test, but made of layers every engine has rules for.
    torch.manual_seed(7)
    return nn.Sequential(
        nn.Conv3d(1, 4, 3, padding=1), nn.GroupNorm(2, 4), nn.Tanh(), nn.Conv3d(4, 2, 1)
    )


def _seg_data(n, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 6, 6, 6, generator=g), torch.randint(0, 2, (n, 6, 6, 6), generator=g)


def _ce(out, y):
    return nn.functional.cross_entropy(out, y)


def test_fedavg_of_sites_equals_centralized_sgd_on_pooled_data():
    # Full-batch gradient steps, one local step per round: site k returns w - lr g_k with g_k
    # its mean-loss gradient, and the example-weighted mean of those is w - lr * sum_k
    # (n_k / N) g_k = w - lr g(pooled). So R rounds of FedAvg = R pooled full-batch steps.
    sizes, lr, rounds = (3, 5, 8), 0.1, 4
    data = [_data(n, seed=k) for k, n in enumerate(sizes)]
    sites = [
        Site(
            f"s{k}",
            k,
            TensorDataset(x, y),
            _mlp,
            SiteConfig(engine="none", optimizer="sgd", lr=lr, batch_size=len(x), poisson=False),
            loss_fn=_mse,
        )  # fmt: skip
        for k, (x, y) in enumerate(data)
    ]
    sim = Simulator(sites, _mlp(), FedAvg(), local_steps=1)
    sim.run(rounds)

    central = _mlp()
    opt = torch.optim.SGD(central.parameters(), lr=lr)
    x_all = torch.cat([x for x, _ in data])
    y_all = torch.cat([y for _, y in data])
    for _ in range(rounds):
        opt.zero_grad()
        _mse(central(x_all), y_all).backward()
        opt.step()
    want = trainable_state(central)
    for k, v in sim.weights.items():
        torch.testing.assert_close(v, want[k], rtol=0, atol=1e-12)
    assert not torch.equal(want["0.weight"], _mlp()[0].weight.detach())  # it did train


class _TwoSlicesAPatient(TensorDataset):
    """Items 2i and 2i+1 are patient i's (a dataset that declares its patients, as
    PatchDataset does): the engine rebuilds the site's loader to sample patients."""

    @property
    def patient_ids(self):
        return [i // 2 for i in range(len(self))]


class _OneSliceAPatient(TensorDataset):
    """Item i is patient i's (PatchDataset's declaration)."""

    @property
    def patient_ids(self):
        return list(range(len(self)))


def _dp_site(
    k, n, engine="dpseg", accountant="rdp", sigma=1.1, batch=3, max_epsilon=None, seed=0,
    declared=True, patients=False, secret=None,
):  # fmt: skip
    """A site of n cases. ``declared``: q (Opacus's 1 / ceil(n / batch), as a constant) and
    the normaliser declared, so the site's epsilon is for add/remove adjacency."""
    x, y = _seg_data(n, seed=k)
    q = poisson_rate(n, batch)[0] if declared else None
    cfg = SiteConfig(engine=engine, optimizer="sgd", lr=0.05, batch_size=batch,
                     sample_rate=q, accountant=accountant,
                     max_epsilon=max_epsilon, delta=1e-5)  # fmt: skip
    data = (_TwoSlicesAPatient if patients else TensorDataset)(x, y)
    return Site(f"s{k}", k, data, _conv_net, cfg, noise_multiplier=sigma, seed=seed,
                secret=secret, loss_fn=_ce)  # fmt: skip


@pytest.mark.parametrize("engine,accountant", [("dpseg", "prv"), ("opacus", "rdp")])
def test_ledger_composes_like_a_hand_run_accountant(engine, accountant):
    sizes, steps, rounds, sigma = (6, 10), 3, 2, 1.1
    sites = [_dp_site(k, n, engine, accountant, sigma) for k, n in enumerate(sizes)]
    sim = Simulator(sites, _conv_net(), FedAvg(), local_steps=steps)
    sim.run(rounds)
    cls = {"rdp": RDPAccountant, "prv": PRVAccountant}[accountant]
    for site, n in zip(sites, sizes, strict=True):
        q, _ = poisson_rate(n, 3)
        assert site.sample_rate == q
        hand = cls()
        for r in range(1, rounds + 1):
            for _ in range(steps):
                hand.step(noise_multiplier=sigma, sample_rate=q)
            rec = site.ledger.records[r - 1]
            assert rec["round"] == r and rec["steps"] == r * steps
            assert rec["epsilon"] == pytest.approx(hand.get_epsilon(1e-5), rel=1e-9)
            assert sim.history[r - 1]["sites"][site.name]["epsilon"] == rec["epsilon"]
        assert site.epsilon == pytest.approx(hand.get_epsilon(1e-5), rel=1e-9)
    # A larger site has a smaller q, so it spends less for the same steps.
    assert sites[1].epsilon < sites[0].epsilon


def test_a_site_whose_rate_reads_its_size_reports_replace_one():
    from dpseg.privacy.accountants import ReplaceOneAccountant

    site = _dp_site(0, 6, declared=False)
    sim = Simulator([site], _conv_net(), FedAvg(), local_steps=2)
    sim.run(1)
    assert isinstance(site.ledger.accountant, ReplaceOneAccountant)
    hand = ReplaceOneAccountant()
    hand.history = [(1.1, 0.5, 2)]
    assert site.epsilon == pytest.approx(hand.get_epsilon(1e-5), rel=1e-12)


class _Flaky(Dataset):
    """Raises on every item while ``broken`` is set (a disk gone away mid-round)."""

    def __init__(self, x, y):
        self.x, self.y, self.broken = x, y, False

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        if self.broken:
            raise OSError("simulated failure: the site's disk went away")
        return self.x[i], self.y[i]


def test_a_failing_site_is_left_out_and_the_run_goes_on(capsys):
    sizes = (4, 6, 5)
    datasets = [_Flaky(*_data(n, seed=k)) for k, n in enumerate(sizes)]
    cfg = SiteConfig(engine="none", optimizer="sgd", lr=0.1, batch_size=8, poisson=False)
    sites = [Site(f"s{k}", k, d, _mlp, cfg, loss_fn=_mse) for k, d in enumerate(datasets)]
    sim = Simulator(sites, _mlp(), FedAvg(), local_steps=1)
    sim.run_round()
    before = {k: v.clone() for k, v in sim.weights.items()}
    datasets[1].broken = True
    # What the two healthy sites would contribute, computed on copies.
    twins = [copy.deepcopy(sites[0]), copy.deepcopy(sites[2])]
    ups = [t.fit(before, 1) for t in twins]
    rec = sim.run_round()
    assert (
        rec["sites"]["s1"]["status"] == "failed" and "disk went away" in rec["sites"]["s1"]["error"]
    )
    assert rec["sites"]["s0"]["status"] == rec["sites"]["s2"]["status"] == "ok"
    want = FedAvg().aggregate(before, ups)
    for k in want:
        torch.testing.assert_close(sim.weights[k], want[k], rtol=0, atol=1e-12)
    assert "s1 failed" in capsys.readouterr().out
    datasets[1].broken = False
    assert sim.run_round()["sites"]["s1"]["status"] == "ok"  # back in the next round


def test_budget_exhaustion_stops_a_site_and_never_overspends():
    # s0 (4 cases, q = 1/2) spends fast; s1 (9 cases, q = 1/3) slower.
    limit = 8.0
    sites = [_dp_site(0, 4, max_epsilon=limit), _dp_site(1, 9, max_epsilon=limit)]
    sim = Simulator(sites, _conv_net(), FedAvg(), local_steps=4)
    sim.run(30)
    s0, s1 = sites
    assert s0.exhausted and "privacy budget spent" in s0.exhausted
    stopped = next(r["round"] for r in sim.history if r["sites"]["s0"]["status"] == "budget")
    assert stopped >= 2
    assert all(r["sites"]["s0"]["status"] == "budget" for r in sim.history[stopped - 1 :])
    assert all(r["sites"]["s0"]["steps"] == 0 for r in sim.history[stopped - 1 :])
    for s in sites:
        assert s.epsilon <= limit
        # It stopped because one more round would pass the limit.
        assert s.ledger.projected_epsilon(s.noise_multiplier, s.sample_rate, 4) > limit
    assert s1.exhausted  # eventually both; the run then stops by itself
    assert sim.round < 30
    with pytest.raises(BudgetExhausted):
        s0.fit(sim.weights, 1)


@pytest.mark.parametrize("patients", [False, True])
def test_resume_from_state_matches_uninterrupted_run(patients):
    # The in-process view of --resume (the CLI test does it through files) and of a Flower
    # site rebuilt for each message: rounds 1-2, state to a fresh set of objects, round 3;
    # the same weights and ledgers as 3 rounds straight. With declared patients the engine
    # rebuilds the site's loader; it must keep drawing from the keyed stream.
    def build(secret=17):
        sites = [
            _dp_site(k, n, seed=5, patients=patients, secret=site_secret(secret, k))
            for k, n in enumerate((6, 8))
        ]
        return Simulator(sites, _conv_net(), FedProx(mu=0.1), local_steps=2, fraction=0.5,
                         seed=5, secret=secret)  # fmt: skip

    straight = build()
    straight.run(3)
    first = build()
    first.run(2)
    state = copy.deepcopy(first.state_dict())
    second = build()
    second.load_state_dict(state)
    second.run(3)
    for k, v in straight.weights.items():
        assert torch.equal(v, second.weights[k]), k
    for a, b in zip(straight.sites, second.sites, strict=True):
        assert a.ledger.history == b.ledger.history and a.epsilon == b.epsilon
    assert [r["sampled"] for r in straight.history] == [r["sampled"] for r in second.history]
    # The state alone does not replay round 3: resumed under another secret, it draws other
    # batches and noise.
    other = build(secret=18)
    other.load_state_dict(copy.deepcopy(state))
    other.run(3)
    assert not torch.equal(other.weights["0.weight"], straight.weights["0.weight"])


def _leaves(obj):
    """Every (path, value) leaf of a nested dict/list state."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            for path, leaf in _leaves(v):
                yield (str(k), *path), leaf
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            for path, leaf in _leaves(v):
                yield (str(i), *path), leaf
    else:
        yield (), obj


@pytest.mark.parametrize("engine", ["dpseg", "opacus"])
def test_sampling_and_noise_are_keyed_by_a_secret_the_checkpoint_does_not_hold(engine):
    # The public seed alone must not fix a site's batches or noise: anyone holding a run's
    # record (its --seed) could replay them and subtract the noise from a released update.
    def run(secret, seed=5, torch_seed=0, client_dp=False, server_secret=None):
        sites = [
            _dp_site(k, n, engine=engine, seed=seed,
                     secret=None if secret is None else site_secret(secret, k))
            for k, n in enumerate((6, 8))
        ]  # fmt: skip
        server = secret if server_secret is None else server_secret
        if client_dp:  # the server's randomness too: which sites, and the client-level noise
            sim = Simulator(sites, _conv_net(), FedAvg(), local_steps=2, fraction=0.5, seed=seed,
                            secret=server, client_dp={"clip": 10.0, "noise_multiplier": 0.5,
                                                      "delta": 1e-5})  # fmt: skip
        else:  # every site every round, no server noise: only the sites draw
            sim = Simulator(sites, _conv_net(), FedAvg(), local_steps=2, seed=seed, secret=server)
        torch.manual_seed(torch_seed)  # nothing of the sampling or noise draws on it
        sim.run(2)
        return sim

    def same(a, b):
        return all(torch.equal(v, b.weights[k]) for k, v in a.weights.items())

    # The sites: the same secret replays them (whatever torch's global generator holds),
    # and without one (OS entropy) two runs with the same public seed draw apart.
    assert same(run(secret=3), run(secret=3, torch_seed=1))
    assert not same(run(secret=None), run(secret=None))
    assert not same(run(secret=3), run(secret=4, server_secret=3))  # the sites' secrets alone
    # The server: with the sites' secrets fixed, its own secret moves the run.
    with_dp = run(secret=3, client_dp=True)
    assert same(with_dp, run(secret=3, client_dp=True, torch_seed=1))
    assert not same(with_dp, run(secret=3, client_dp=True, server_secret=4))

    # Nothing in the checkpoint can regenerate the randomness: no generator state, no
    # noise seed, no key, and no integer that equals a key or a seed derived from it.
    from dpseg.federated.site import _TAG

    state = with_dp.state_dict()
    secret_ints = {with_dp._key, derive_seed(with_dp._key, 2)}
    for site in with_dp.sites:
        secret_ints |= {site._key, *(derive_seed(site._key, _TAG, p) for p in (1, 2, 3))}
    for path, leaf in _leaves(state):
        assert not {"noise_seed", "loader_rng", "noise_rng", "generator", "sampler"} & set(path)
        if isinstance(leaf, int):
            assert leaf not in secret_ints, path
        # (torch's global generator is saved for dropout and the like; run() shows that
        # the sampling and the noise do not draw on it)
        if isinstance(leaf, torch.Tensor) and leaf.dtype == torch.uint8 and path != ("torch_rng",):
            raise AssertionError(f"a byte tensor (an RNG state?) at {path}")


def test_a_shuffled_site_resumes_exactly():
    # engine "none" without Poisson sampling: fixed shuffled batches, keyed as Poisson
    # draws are (the RandomSampler's generator), so a resumed site replays them too.
    def build():
        x, y = _seg_data(7, seed=1)
        cfg = SiteConfig(engine="none", optimizer="sgd", lr=0.05, batch_size=2, poisson=False)
        site = Site("s0", 0, TensorDataset(x, y), _conv_net, cfg, secret=9, loss_fn=_ce)
        return Simulator([site], _conv_net(), FedAvg(), local_steps=2, secret=9)

    straight = build()
    straight.run(3)
    first = build()
    first.run(1)
    second = build()
    second.load_state_dict(copy.deepcopy(first.state_dict()))
    second.run(3)
    assert all(torch.equal(v, second.weights[k]) for k, v in straight.weights.items())


@pytest.mark.parametrize("engine", ["none", "dpseg", "opacus"])
def test_fedprox_term_is_added_after_the_dp_step(engine):
    # Linear model, every sample the same x, q = 1 (the whole site each step), sigma = 0 and
    # a clipping bound that never binds: the private gradient is exactly x. With the proximal
    # gradient mu (w - w_g) added after clipping, two SGD steps from w_g give
    # w1 = w_g - lr x and w2 = w1 - lr (x + mu (w1 - w_g)) = w_g - 2 lr x + lr^2 mu x.
    x = torch.tensor([[1.0, -2.0, 0.5]]).repeat(4, 1)

    def model_fn():
        m = nn.Linear(3, 1, bias=False)
        nn.init.constant_(m.weight, 0.3)
        return m

    cfg = SiteConfig(engine=engine, optimizer="sgd", lr=0.1, batch_size=4, max_grad_norm=1e6)
    site = Site("s", 0, TensorDataset(x, torch.zeros(4)), model_fn, cfg, noise_multiplier=0.0,
                loss_fn=lambda out, y: out.mean())  # fmt: skip
    assert site.sample_rate == 1.0
    w_g = trainable_state(model_fn())
    mu, lr = 0.5, 0.1
    update = site.fit(w_g, 2, {"proximal_mu": mu})
    want = -2 * lr * x[0] + lr**2 * mu * x[0]
    torch.testing.assert_close(update.delta["weight"][0], want, rtol=1e-5, atol=1e-7)
    # Without mu the same two steps are plain SGD.
    site2 = Site("s", 0, TensorDataset(x, torch.zeros(4)), model_fn, cfg, noise_multiplier=0.0,
                 loss_fn=lambda out, y: out.mean())  # fmt: skip
    torch.testing.assert_close(site2.fit(w_g, 2).delta["weight"][0], -2 * lr * x[0])


def test_client_level_dp_is_accounted_per_round_with_site_sampling():
    sites = [_dp_site(k, 4, engine="none", sigma=0.0) for k in range(4)]
    client_dp = {"clip": 0.5, "noise_multiplier": 1.3, "delta": 1e-5}
    sim = Simulator(sites, _conv_net(), FedAvg(), local_steps=1, fraction=0.5, client_dp=client_dp)
    sim.run(3)
    hand = RDPAccountant()
    for r in sim.history:
        hand.step(noise_multiplier=1.3, sample_rate=0.5)
        assert r["client_epsilon"] == pytest.approx(hand.get_epsilon(1e-5))
    assert math.isfinite(sim.server_ledger.epsilon)
    # Poisson sampling of sites: the number sampled varies by round (here 0 to 4).
    assert all(0 <= len(r["sampled"]) <= 4 for r in sim.history)


def test_opacus_with_conv_transpose_warns_about_empty_batches():
    from dpseg.models import UNet

    ds = TensorDataset(torch.randn(4, 1, 8, 8, 8), torch.randint(0, 2, (4, 8, 8, 8)))

    def model_fn():
        return UNet(3, 1, 2, channels=(2, 4), upsample="transpose")

    with pytest.warns(UserWarning, match="upsample='interp'"):
        Site("s", 0, ds, model_fn, SiteConfig(engine="opacus", batch_size=2), loss_fn=_ce)


@pytest.mark.parametrize("engine", ["dpseg", "opacus"])
def test_each_site_ledger_names_its_unit_and_keeps_it_on_resume(engine):
    from dpseg.train.saved_model import federated_privacy

    def build(unit):
        x, y = _seg_data(6, seed=0)
        cfg = SiteConfig(engine=engine, optimizer="sgd", lr=0.05, batch_size=3,
                         sample_rate=0.5, accountant="rdp", privacy_unit=unit)  # fmt: skip
        site = Site("s0", 0, _OneSliceAPatient(x, y), _conv_net, cfg, noise_multiplier=1.1,
                    secret=1, loss_fn=_ce)  # fmt: skip
        return Simulator([site], _conv_net(), FedAvg(), local_steps=1, secret=1)

    sim = build("case")
    sim.run(1)
    state = sim.state_dict()
    assert state["sites"]["s0"]["ledger"]["unit"] == "case"
    assert federated_privacy(state)["unit"] == "case"  # what dpseg evaluate reports
    with pytest.raises(ValueError, match="per case, this run's per patient"):
        build("patient").load_state_dict(copy.deepcopy(state))
    # A ledger saved before it named its unit resumes under this run's name.
    old = copy.deepcopy(state)
    del old["sites"]["s0"]["ledger"]["unit"]
    build("patient").load_state_dict(old)
    # Without a name the dataset's own holds; under Opacus, rows of a patient with several
    # are not the patient: the ledger says "item".
    x, y = _seg_data(6, seed=0)

    class Named(_OneSliceAPatient):
        privacy_unit = "subject"

    cfg = SiteConfig(engine=engine, optimizer="sgd", batch_size=3, sample_rate=0.5,
                     accountant="rdp")  # fmt: skip
    named = Site("s0", 0, Named(x, y), _conv_net, cfg, secret=1, loss_fn=_ce)
    assert named.ledger.unit == "subject"
    if engine == "opacus":
        rows = Site("s0", 0, _TwoSlicesAPatient(x, y), _conv_net, cfg, secret=1, loss_fn=_ce)
        assert rows.ledger.unit == "item"
