"""The Opacus-shaped surface: validation, Poisson sampling, accounting, checkpoints, and
parity with Opacus."""

from __future__ import annotations

import copy
import math
import warnings

import opacus
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import dpseg
from dpseg.privacy import DPDataLoader, PoissonBatchSampler, PrivacyModelError


def _setup(n=16, batch=4, model=None):
    torch.manual_seed(0)
    model = model or nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.GroupNorm(2, 4), nn.ReLU(), nn.Conv2d(4, 2, 1)
    )
    data = TensorDataset(torch.randn(n, 1, 6, 6), torch.randint(0, 2, (n, 6, 6)))
    return model, torch.optim.SGD(model.parameters(), lr=0.1), DataLoader(data, batch_size=batch)


def _make(engine=None, **kw):
    model, opt, loader = _setup()
    args = dict(
        module=model, optimizer=opt, data_loader=loader, noise_multiplier=1.0, max_grad_norm=1.0
    )
    args.update(kw)
    return (engine or dpseg.PrivacyEngine()).make_private(**args)


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"max_grad_norm": 0.0}, "max_grad_norm must be > 0"),
        ({"max_grad_norm": -1.0}, "max_grad_norm must be > 0"),
        ({"noise_multiplier": -0.1}, "noise_multiplier must be >= 0"),
        ({"noise_multiplier": float("nan")}, "noise_multiplier must be finite"),
        ({"noise_multiplier": float("inf")}, "noise_multiplier must be finite"),
        ({"max_grad_norm": float("inf")}, "max_grad_norm must be finite"),
        ({"noise_multiplier": None}, "noise_multiplier must be a real number, got None"),
        ({"max_grad_norm": "1.0"}, "max_grad_norm must be a real number"),
        ({"loss_reduction": "none"}, "loss_reduction must be one of"),
        ({"backend": "fortran"}, "unknown backend"),
        ({"clipping": "per_layer"}, "flat clipping only"),
    ],
)
def test_bad_arguments_are_refused_with_the_fix(kwargs, message):
    with pytest.raises(ValueError, match=message):
        _make(**kwargs)


def test_unknown_accountant_and_secure_seed_are_refused():
    with pytest.raises(ValueError, match="unknown accountant"):
        dpseg.PrivacyEngine(accountant="moments")
    with pytest.warns(UserWarning, match="secure_mode"):
        engine = dpseg.PrivacyEngine(secure_mode=True)
    with pytest.raises(ValueError, match="refused in secure_mode"):
        _make(engine, noise_seed=3)


def test_batchnorm_is_refused_and_fix_replaces_it():
    model = nn.Sequential(nn.Conv3d(1, 6, 3), nn.BatchNorm3d(6), nn.ReLU(), nn.Conv3d(6, 2, 1))
    _, opt, loader = _setup()
    with pytest.raises(PrivacyModelError, match=r"dpseg.privacy.fix\(model\)"):
        dpseg.PrivacyEngine().make_private(
            module=model, optimizer=opt, data_loader=loader, noise_multiplier=1, max_grad_norm=1
        )
    fixed = dpseg.fix(model)
    assert isinstance(fixed[1], nn.GroupNorm) and fixed[1].num_groups == 6
    assert isinstance(model[1], nn.BatchNorm3d), "fix copies unless inplace=True"
    dpseg.privacy.validate(fixed)


def test_stray_optimizer_parameters_are_refused():
    model, _, loader = _setup()
    extra = nn.Parameter(torch.zeros(3))
    opt = torch.optim.SGD([*model.parameters(), extra], lr=0.1)
    with pytest.raises(ValueError, match="not in the module"):
        dpseg.PrivacyEngine().make_private(
            module=model, optimizer=opt, data_loader=loader, noise_multiplier=1, max_grad_norm=1
        )


def test_non_finite_per_sample_norm_raises_with_index_and_applies_nothing():
    model, opt, loader = _make(noise_seed=0)
    before = copy.deepcopy(model.state_dict())
    x = torch.randn(3, 1, 6, 6)
    x[1, 0, 2, 2] = float("inf")
    F.cross_entropy(model(x), torch.zeros(3, 6, 6, dtype=torch.long)).backward()
    with pytest.raises(FloatingPointError, match=r"item\(s\) \[1\]"):
        opt.step()
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert opt.steps_taken == 0


def test_parameters_beside_submodules_train_exactly_and_the_batch_must_stay_the_batch():
    class Owner(nn.Module):
        """A parameter of its own beside a child layer (a position embedding, a scale)."""

        def __init__(self):
            super().__init__()
            self.scale = nn.Parameter(torch.full((1, 2, 1, 1), 1.5))
            self.conv = nn.Conv2d(1, 2, 3, padding=1)

        def forward(self, x):
            return torch.tanh(self.conv(x)) * self.scale + self.scale**2

    torch.manual_seed(0)
    model = Owner().double()
    oracle = copy.deepcopy(model)
    x = torch.randn(3, 1, 6, 6, dtype=torch.float64)
    y = torch.randint(0, 2, (3, 6, 6))
    data = DataLoader(TensorDataset(x, y), batch_size=3)
    with pytest.warns(UserWarning, match=r"\['Owner'\] \(parameters beside submodules\)"):
        pmodel, opt, _ = dpseg.PrivacyEngine().make_private(
            module=model, optimizer=torch.optim.SGD(model.parameters(), lr=1.0),
            data_loader=data, noise_multiplier=0.0, max_grad_norm=1e3,
        )  # fmt: skip
    F.cross_entropy(pmodel(x), y).backward()
    per_sample = {n: p.grad_sample for n, p in model.named_parameters()}
    from tests.oracle import per_sample_grads

    def loss(pred, t):
        return F.cross_entropy(pred, t)

    want = per_sample_grads(oracle, loss, x, y)
    for n, g in per_sample.items():
        torch.testing.assert_close(g * 3, want[n], rtol=1e-9, atol=1e-12)  # mean over 3

    class Windows(nn.Module):
        """Reshapes the batch into rows that are not samples: refused, not run wrong."""

        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 2)

        def forward(self, x):
            return self.lin(x.reshape(-1, 4)).reshape(x.shape[0], -1)

    model = Windows().double()
    pmodel, opt, _ = dpseg.PrivacyEngine().make_private(
        module=model, optimizer=torch.optim.SGD(model.parameters(), lr=1.0),
        data_loader=DataLoader(TensorDataset(torch.randn(4, 8)), batch_size=2),
        noise_multiplier=0.0, max_grad_norm=1.0,
    )  # fmt: skip
    with pytest.raises(ValueError, match="register_functional_block"):
        pmodel(torch.randn(2, 8, dtype=torch.float64))


def test_poisson_sampler_rate_and_empty_batches():
    n, q, steps = 50, 0.1, 400
    sampler = PoissonBatchSampler(n, q, steps, generator=torch.Generator().manual_seed(0))
    sizes = torch.tensor([len(b) for b in sampler], dtype=torch.float64)
    # Binomial(50, 0.1): mean 5, variance 4.5; the mean of 400 batches has sd 0.106
    assert abs(sizes.mean() - n * q) < 5 * math.sqrt(n * q * (1 - q) / steps)
    assert abs(sizes.var() - n * q * (1 - q)) < 1.5
    assert (sizes == 0).any(), "P(empty) = 0.9^50 = 0.5%: expected a few in 400 draws"
    secure = PoissonBatchSampler(n, q, steps, secure=True)
    assert abs(torch.tensor([len(b) for b in secure], dtype=torch.float64).mean() - 5) < 0.6


def test_dp_loader_collates_empty_batches_with_example_shapes():
    data = TensorDataset(torch.randn(4, 1, 5, 5), torch.randint(0, 2, (4, 5, 5)))
    loader = DPDataLoader(data, sample_rate=1e-9, steps=3)
    for x, y in loader:
        assert x.shape == (0, 1, 5, 5) and x.dtype == torch.float32
        assert y.shape == (0, 5, 5) and y.dtype == torch.int64


def test_make_private_returns_a_poisson_loader_with_q_one_over_len():
    model, opt, loader = _make()
    assert isinstance(loader, DPDataLoader) and loader.sample_rate == pytest.approx(1 / 4)
    assert len(loader) == 4


def test_training_loop_steps_and_epsilon_matches_opacus_accountant():
    # Declared constants: add/remove adjacency, Opacus's own accountant.
    engine = dpseg.PrivacyEngine(accountant="rdp")
    model, opt, loader = _make(
        engine, noise_multiplier=1.1, noise_seed=1, sample_rate=0.25, expected_batch_size=4
    )
    for x, y in loader:
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    assert opt.steps_taken == 4
    reference = opacus.accountants.RDPAccountant()
    for _ in range(4):
        reference.step(noise_multiplier=1.1, sample_rate=0.25)
    assert engine.get_epsilon(1e-5) == pytest.approx(reference.get_epsilon(1e-5), rel=1e-12)


@pytest.mark.parametrize("declared", [True, False])
def test_make_private_with_epsilon_hits_the_target(declared):
    # Under the accountant that reports the run: Opacus's RDP when q and the normaliser
    # are declared, dp_accounting's replace-one PLD when they were derived from N.
    engine = dpseg.PrivacyEngine(accountant="rdp")
    model, opt, loader = _setup()
    kw = {"sample_rate": 0.25, "expected_batch_size": 4} if declared else {}
    model, opt, loader = engine.make_private_with_epsilon(
        module=model,
        optimizer=opt,
        data_loader=loader,
        target_epsilon=4.0,
        target_delta=1e-5,
        epochs=3,
        max_grad_norm=1.0,
        **kw,
    )
    assert engine.accountant.mechanism() == ("rdp" if declared else "pld-replace-one")
    for _ in range(3 * len(loader)):
        engine.accountant.step(
            noise_multiplier=opt.noise_multiplier, sample_rate=engine.sample_rate
        )
    eps = engine.get_epsilon(1e-5)
    assert 3.9 < eps <= 4.0 + 1e-9


def test_prv_accountant_and_zero_steps():
    engine = dpseg.PrivacyEngine(accountant="prv")
    assert engine.get_epsilon(1e-5) == 0.0
    engine.accountant.step(noise_multiplier=1.0, sample_rate=0.01)
    ref = opacus.accountants.PRVAccountant()
    ref.step(noise_multiplier=1.0, sample_rate=0.01)
    assert engine.get_epsilon(1e-5) == pytest.approx(ref.get_epsilon(1e-5), rel=1e-9)


def test_checkpoint_keeps_the_ledger_and_the_noise_counter():
    engine = dpseg.PrivacyEngine(accountant="rdp")
    model, opt, loader = _make(engine, noise_seed=5, sample_rate=0.25, expected_batch_size=4)
    for x, y in loader:
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    eps = engine.get_epsilon(1e-5)
    state = {"engine": engine.state_dict(), "optimizer": opt.state_dict()}
    assert state["engine"]["adjacency"] == "add/remove" and state["engine"]["unit"] == "item"
    engine2 = dpseg.PrivacyEngine(accountant="rdp")
    _, opt2, _ = _make(engine2, sample_rate=0.25, expected_batch_size=4)
    engine2.load_state_dict(state["engine"])
    opt2.load_state_dict(state["optimizer"])
    assert engine2.get_epsilon(1e-5) == eps > 0
    assert opt2.steps_taken == 4 and opt2.noise_seed == 5
    with pytest.raises(ValueError, match="accountant='rdp'"):
        dpseg.PrivacyEngine(accountant="prv").load_state_dict(state["engine"])
    # A ledger kept under add/remove cannot continue under another guarantee.
    engine3 = dpseg.PrivacyEngine(accountant="rdp")
    engine3.load_state_dict(state["engine"])
    with pytest.raises(ValueError, match="kept per item, add/remove"):
        _make(engine3)  # q derived from N: replace-one


def test_release_returns_the_plain_model():
    model, opt, loader = _make()
    plain = model.release()
    x = torch.randn(2, 1, 6, 6, requires_grad=True)
    plain(x).sum().backward()
    assert all(
        p.grad is not None and getattr(p, "grad_sample", None) is None for p in plain.parameters()
    )


def test_per_sample_norms_agree_with_opacus():
    torch.manual_seed(4)
    net = nn.Sequential(
        nn.Conv3d(1, 4, 3, padding=1),
        nn.GroupNorm(2, 4),
        nn.ReLU(),
        nn.Conv3d(4, 4, 3, stride=2, padding=1),
        nn.InstanceNorm3d(4, affine=True),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(4 * 27, 3),
    ).double()
    x = torch.randn(5, 1, 6, 6, 6, dtype=torch.float64)
    y = torch.randint(0, 3, (5,))
    loader = DataLoader(TensorDataset(x, y), batch_size=5)
    norms = {}
    for name, engine in [("dpseg", dpseg.PrivacyEngine()), ("opacus", opacus.PrivacyEngine())]:
        model = copy.deepcopy(net)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model, opt, _ = engine.make_private(
                module=model,
                optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
                data_loader=loader,
                noise_multiplier=0.0,
                max_grad_norm=1.0,
                poisson_sampling=False,
            )
        F.cross_entropy(model(x), y).backward()
        if name == "dpseg":
            opt.step()
            norms[name] = opt.last_per_sample_norms
        else:
            per = torch.stack(
                [p.grad_sample.reshape(5, -1).norm(dim=1) for p in model.parameters()], 1
            )
            norms[name] = per.norm(dim=1)
    torch.testing.assert_close(norms["dpseg"], norms["opacus"], rtol=1e-9, atol=0)


def test_a_poisson_loader_keeps_its_own_sample_rate():
    # A DPDataLoader built by hand (rate 0.1, 3 steps) is accounted at its rate, not 1/3.
    data = TensorDataset(torch.randn(20, 1, 6, 6), torch.randint(0, 2, (20, 6, 6)))
    loader = DPDataLoader(data, sample_rate=0.1, steps=3)
    model, opt, _ = _setup()
    engine = dpseg.PrivacyEngine(accountant="rdp")
    _, dp_opt, same = engine.make_private(
        module=model, optimizer=opt, data_loader=loader, noise_multiplier=1.0, max_grad_norm=1.0
    )
    assert same is loader and engine.sample_rate == 0.1 and dp_opt.expected_batch_size == 2


def test_a_unit_called_with_a_second_differentiable_input_is_refused():
    # nn.MultiheadAttention owns in_proj_weight beside out_proj: a torch.func unit, which
    # differentiates its first input only; attn(x, x, x) would lose the gradient through k, v.
    class SelfAttention(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = nn.MultiheadAttention(4, 1, batch_first=True)

        def forward(self, x):
            return self.attn(x, x, x, need_weights=False)[0]

    model = SelfAttention().double()
    with pytest.warns(UserWarning, match="MultiheadAttention"):
        pmodel, _, _ = dpseg.PrivacyEngine().make_private(
            module=model, optimizer=torch.optim.SGD(model.parameters(), lr=1.0),
            data_loader=DataLoader(TensorDataset(torch.randn(4, 3, 4)), batch_size=2),
            noise_multiplier=0.0, max_grad_norm=1.0,
        )  # fmt: skip
    with pytest.raises(TypeError, match="gradient through the others would be lost"):
        pmodel(torch.randn(2, 3, 4, dtype=torch.float64, requires_grad=True))


def test_dropout_inside_a_unit_is_refused_whenever_it_would_draw():
    # A torch.func unit replays its forward per sample: a dropout inside it would draw other
    # masks than the forward did. Refused at the call, in whatever mode make_private saw.
    class Owner(nn.Module):
        def __init__(self):
            super().__init__()
            self.scale = nn.Parameter(torch.ones(1))
            self.conv = nn.Conv2d(1, 2, 3, padding=1)
            self.drop = nn.Dropout(0.2)

        def forward(self, x):
            return self.drop(self.conv(x)) * self.scale

    model = Owner().double().eval()  # captured in eval mode, trained after
    with pytest.warns(UserWarning, match="Owner"):
        pmodel, _, _ = dpseg.PrivacyEngine().make_private(
            module=model, optimizer=torch.optim.SGD(model.parameters(), lr=1.0),
            data_loader=DataLoader(TensorDataset(torch.randn(4, 1, 6, 6)), batch_size=2),
            noise_multiplier=0.0, max_grad_norm=1.0,
        )  # fmt: skip
    x = torch.randn(2, 1, 6, 6, dtype=torch.float64)
    pmodel(x).sum().backward()  # eval: the dropout is the identity, nothing to replay
    pmodel.zero_grad()
    for p in model.parameters():
        p.grad_sample = None
    pmodel.train()
    with pytest.raises(ValueError, match=r"drop \(Dropout, p=0.2\).*drop rate to 0"):
        pmodel(x)
    model.drop.p = 0.0  # no draw: runs
    pmodel(x).sum().backward()


_ROWS = TensorDataset(torch.arange(40.0).view(40, 1).repeat(1, 3))  # row i holds i


def _private_linear(engine, loader, **kwargs):
    """(the Linear(3, 1), its private module, optimizer and loader), at q = 0.25 and a
    normaliser of 10 unless told otherwise."""
    linear = nn.Linear(3, 1)
    kwargs = {"sample_rate": 0.25, "expected_batch_size": 10, **kwargs}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model, opt, loader = engine.make_private(
            module=linear, optimizer=torch.optim.SGD(linear.parameters(), lr=1.0),
            data_loader=loader, noise_multiplier=1.0, max_grad_norm=1.0, **kwargs,
        )  # fmt: skip
    return linear, model, opt, loader


def _zero_gradient_run(engine, steps, load=None, loader=None, noise_seed=1234, order="first"):
    """``steps`` DP steps of a Linear whose loss has zero gradient (the update is the noise
    alone), seeded noise and sampling: (the noise of each step, the rows of each batch).
    ``load``: a ledger loaded before make_private (order "first") or after it ("after",
    Opacus's order)."""
    if load is not None and order == "first":
        engine.load_state_dict(load)
    linear, model, opt, loader = _private_linear(
        engine, loader or DataLoader(_ROWS, batch_size=8), noise_seed=noise_seed
    )
    nn.init.zeros_(linear.weight)  # its update is then the noise, to the bit
    if load is not None and order == "after":
        engine.load_state_dict(load)
    noises, batches = [], []
    for (xb,) in loader:
        before = linear.weight.detach().clone()
        opt.zero_grad()
        (0.0 * model(xb).sum()).backward()
        opt.step()
        noises.append(linear.weight.detach() - before)
        batches.append(xb[:, 0].tolist())
        if len(noises) == steps:
            break
    return noises, batches, opt


@pytest.mark.parametrize("order", ["first", "after"])
def test_a_resumed_ledger_moves_the_noise_counter_and_the_sampling_stream_on(order):
    """Resuming by engine.load_state_dict, before make_private or after it, with the run's
    seed: the step counter starts at the ledger's steps, so the noise of a resumed step is
    not that of an earlier one (equal noise would cancel between two released models), and
    the seeded Poisson sampler does not replay the first run's batches."""
    first = dpseg.PrivacyEngine()
    noise_a, batches_a, _ = _zero_gradient_run(first, 3)
    again, batches_again, _ = _zero_gradient_run(dpseg.PrivacyEngine(), 1)
    torch.testing.assert_close(again[0], noise_a[0], rtol=0, atol=0)  # seeded: reproducible
    assert batches_again[0] == batches_a[0]
    ledger = first.state_dict()
    resumed = dpseg.PrivacyEngine()
    noise_b, batches_b, opt = _zero_gradient_run(resumed, 3, load=ledger, order=order)
    assert opt.steps_taken == 6 and resumed.get_privacy_spent(1e-5)["steps"] == 6
    for b in noise_b:
        for a in noise_a:
            assert not torch.equal(a, b)
    assert batches_b != batches_a
    # an optimizer state from an earlier step does not turn the counter back
    older = {"dpseg": {"steps_taken": 1}, **opt.original_optimizer.state_dict()}
    opt.load_state_dict(older)
    assert opt.steps_taken == 6


def _seeded_generator():
    return torch.Generator().manual_seed(7)


def _seeded_globally():
    torch.manual_seed(7)  # a script's first line
    return DataLoader(_ROWS, batch_size=8)


# A script run twice the same way, without noise_seed: sampling seeded by the user's own
# generator, by torch.manual_seed on the global one, by a DPDataLoader the user built, or by
# a generator never seeded (torch.Generator() starts from a constant).
SEEDED_SAMPLING = {
    "loader generator": lambda: DataLoader(_ROWS, batch_size=8, generator=_seeded_generator()),
    "global generator": _seeded_globally,
    "user DPDataLoader": lambda: DPDataLoader(_ROWS, 0.25, generator=_seeded_generator()),
    "unseeded generator": lambda: DataLoader(_ROWS, batch_size=8, generator=torch.Generator()),
}


def _batches(loader, steps):
    return [xb[:, 0].tolist() for (xb,), _ in zip(loader, range(steps), strict=False)]


@pytest.mark.parametrize("order", ["first", "after"])
@pytest.mark.parametrize("how", SEEDED_SAMPLING)
def test_a_resumed_run_does_not_replay_sampling_seeded_by_the_user(how, order):
    """Seeded the user's way (no noise_seed), a resumed run's step k + j drew step j's batch:
    correlated batches, where the accounting assumes independent ones. Resumed with the
    ledger loaded before make_private or after it, it now draws a stream of its own, still
    reproducible; a fresh run samples as the user's loader always did."""
    first = dpseg.PrivacyEngine()
    _, batches_a, _ = _zero_gradient_run(first, 6, loader=SEEDED_SAMPLING[how](), noise_seed=None)
    if how in ("loader generator", "user DPDataLoader"):  # fresh: the user's own stream
        plain = DPDataLoader(_ROWS, 0.25, generator=_seeded_generator())
        assert batches_a == _batches(plain, 6)
    _, again, _ = _zero_gradient_run(
        dpseg.PrivacyEngine(), 6, loader=SEEDED_SAMPLING[how](), noise_seed=None
    )
    assert again == batches_a  # the script's sampling is seeded: the premise of the bug
    ledger = dpseg.PrivacyEngine()
    _zero_gradient_run(ledger, 3, loader=SEEDED_SAMPLING[how](), noise_seed=None)
    resumed = []
    for _ in range(2):
        engine = dpseg.PrivacyEngine()
        _, batches_b, opt = _zero_gradient_run(
            engine, 3, load=ledger.state_dict(), loader=SEEDED_SAMPLING[how](),
            noise_seed=None, order=order,
        )  # fmt: skip
        assert opt.steps_taken == 6
        assert all(b != a for a, b in zip(batches_a, batches_b, strict=False)), how
        stream = engine._sampling_stream.loader
        assert stream.generator is stream.batch_sampler.generator  # workers' seeds move too
        resumed.append(batches_b)
    assert resumed[0] == resumed[1]  # reproducible


def test_load_checkpoint_moves_a_user_seeded_sampler_on(tmp_path):
    engine = dpseg.PrivacyEngine()
    _, batches_a, opt = _zero_gradient_run(
        engine, 4, loader=SEEDED_SAMPLING["loader generator"](), noise_seed=None
    )
    engine.save_checkpoint(path=tmp_path / "c.pt", module=nn.Linear(3, 1), optimizer=opt)
    resumed = []
    for _ in range(2):
        engine = dpseg.PrivacyEngine()
        linear, _, opt, loader = _private_linear(engine, SEEDED_SAMPLING["loader generator"]())
        engine.load_checkpoint(path=tmp_path / "c.pt", module=linear, optimizer=opt)
        assert opt.steps_taken == 4
        batches_b = _batches(loader, 4)
        assert all(b != a for a, b in zip(batches_a, batches_b, strict=True))
        resumed.append(batches_b)
    assert resumed[0] == resumed[1]


def test_secure_mode_samples_a_users_dpdataloader_from_os_entropy():
    """A DPDataLoader built with a seeded generator, handed to a secure engine, was kept
    as it was: its batches replayable from the seed."""
    engine = dpseg.PrivacyEngine(secure_mode=True)
    loader = _private_linear(
        engine, SEEDED_SAMPLING["user DPDataLoader"](), sample_rate=None, expected_batch_size=None
    )[3]
    assert loader.batch_sampler.secure and engine._sampling_stream is None
    plain = DPDataLoader(_ROWS, 0.25, generator=_seeded_generator())
    assert _batches(loader, 6) != _batches(plain, 6)


def test_numpy_and_tensor_scalars_are_numbers():
    import numpy as np

    for sigma, clip in ((np.float32(1.0), np.int64(1)), (torch.tensor(1.0), torch.tensor([2.0]))):
        _, opt, _ = _make(noise_multiplier=sigma, max_grad_norm=clip)
        assert isinstance(opt.noise_multiplier, float) and isinstance(opt.max_grad_norm, float)


def test_no_noise_means_an_infinite_epsilon_said_up_front():
    with pytest.warns(UserWarning, match="noise_multiplier=0: no noise"):
        engine = dpseg.PrivacyEngine()
        model, opt, loader = _make(engine, noise_multiplier=0.0)
    x, y = next(iter(loader))
    opt.zero_grad()
    torch.nn.functional.cross_entropy(model(x), y).backward()
    opt.step()
    assert engine.get_epsilon(1e-5) == float("inf")
