"""Leaks no per-step test sees (issue 23): what the run releases must not depend on the
dataset's size unless N is declared public; losses that couple the samples are refused;
shuffled batches are never accounted as Poisson; a parameter used outside its layer is
refused rather than half-clipped; seeds behave as Opacus users expect."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from opacus.accountants import PRVAccountant
from scipy import stats
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import dpseg
from dpseg.privacy import (
    CoupledLossError,
    EscapedGradientError,
    ReductionMismatchError,
    RowUnits,
    check_loss,
)
from dpseg.privacy.accountants import ReplaceOneAccountant, ShuffledAccountant
from dpseg.privacy.sampling_plan import plan_sampling
from dpseg.train.losses import DiceCELoss
from tests.oracle import dp_sum, per_sample_grads


def _quiet(engine, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return engine.make_private(**kw)


def _linear_run(n, batch, declared, seed, sigma=1.0, dims=200, path="plain"):
    """One pass of a Linear(dims, 50) with zero gradients everywhere: what is released
    (the raw updates) and the engine's plan, for N = n patients."""
    torch.manual_seed(seed)
    model = nn.Linear(dims, 50, bias=False)
    with torch.no_grad():
        model.weight.zero_()
    data = TensorDataset(torch.zeros(n, dims))
    kw = {"sample_rate": 0.1, "expected_batch_size": 10} if declared else {}
    engine = dpseg.PrivacyEngine(accountant="rdp")
    pmodel, opt, loader = _quiet(
        engine, module=model, optimizer=torch.optim.SGD(model.parameters(), lr=1.0),
        data_loader=DataLoader(data, batch_size=batch), noise_multiplier=sigma,
        max_grad_norm=1.0, noise_seed=seed, **kw,
    )  # fmt: skip
    norms = []
    batches = loader
    if path == "batch_memory_manager":
        manager = dpseg.BatchMemoryManager(
            data_loader=loader, max_physical_batch_size=3, optimizer=opt
        )
        batches = manager.__enter__()
    for (xb,) in batches:
        before = model.weight.detach().clone()
        opt.zero_grad()
        (pmodel(xb).sum() / max(1, len(xb))).backward()
        taken = opt.steps_taken
        opt.step()
        if opt.steps_taken > taken:
            norms.append(float((before - model.weight.detach()).norm()))
    return engine, opt, loader, norms


@pytest.mark.parametrize("path", ["plain", "batch_memory_manager"])
@pytest.mark.parametrize("n,batch", [(100, 10), (37, 4), (250, 16)])
def test_declared_constants_release_the_same_mechanism_for_n_and_n_plus_one(n, batch, path):
    plans = []
    for size in (n, n + 1):
        engine, opt, loader, norms = _linear_run(size, batch, True, seed=size, path=path)
        plans.append((engine.sample_rate, len(loader), opt.expected_batch_size, len(norms)))
        assert engine.guarantee.adjacency == "add/remove"
    assert plans[0] == plans[1] == (0.1, 10, 10, 10)  # q, steps a pass, normaliser, released


def test_the_update_norm_cannot_tell_n_from_n_plus_one_with_declared_constants():
    # Issue 23's measurement: every gradient zero, so only N could differ. With Opacus's
    # convention the norm told 100 from 101 in 200 of 200; declared, a two-sample test at
    # alpha 0.01 finds nothing.
    norms = {
        size: [_linear_run(size, 10, True, seed=1000 * size + s)[3][0] for s in range(40)]
        for size in (100, 101)
    }
    assert stats.ks_2samp(norms[100], norms[101]).pvalue > 0.01
    # ... and the same test does separate them under Opacus's convention (N public).
    derived = {
        size: [_linear_run(size, 10, False, seed=1000 * size + s)[3][0] for s in range(40)]
        for size in (100, 101)
    }
    assert stats.ks_2samp(derived[100], derived[101]).pvalue < 1e-6


def test_deriving_from_n_reports_replace_one_epsilon():
    engine, opt, loader, _ = _linear_run(100, 10, False, seed=0)
    assert engine.guarantee.adjacency == "replace-one"
    assert engine.accountant.mechanism() == "pld-replace-one"
    spent = engine.get_privacy_spent(1e-5)
    assert spent["adjacency"] == "replace-one" and spent["steps"] == 10
    # dp_accounting's PLD under REPLACE_ONE, computed independently here.
    from dp_accounting import NeighboringRelation, dp_event
    from dp_accounting.pld.pld_privacy_accountant import PLDAccountant

    ref = PLDAccountant(NeighboringRelation.REPLACE_ONE, 1e-4)
    ref.compose(dp_event.PoissonSampledDpEvent(0.1, dp_event.GaussianDpEvent(1.0)), 10)
    assert spent["epsilon"] == pytest.approx(ref.get_epsilon(1e-5), rel=2e-3)
    add_remove = PRVAccountant()
    add_remove.history = [(1.0, 0.1, 10)]
    assert spent["epsilon"] > 1.1 * add_remove.get_epsilon(1e-5)  # it is the larger one


def test_client_level_dp_divides_by_a_fixed_number_of_expected_sites():
    from dpseg.federated.strategies import ClientLevelDP, FedAvg, SiteUpdate

    dp = ClientLevelDP(FedAvg(), clip=1.0, noise_multiplier=0.0, expected_sites=4)
    deltas = [{"w": torch.full((3,), 0.1 * (i + 1))} for i in range(3)]
    updates = [SiteUpdate(site=f"s{i}", delta=d, num_examples=10 + i) for i, d in enumerate(deltas)]
    # The clipped sum divided by the same constant whatever number of sites took part (and
    # whatever their sizes): adding or removing a site changes only its own term.
    two, three = dp.combine(updates[:2]), dp.combine(updates)
    assert torch.allclose(two["w"], (deltas[0]["w"] + deltas[1]["w"]) / 4)
    assert torch.allclose(three["w"], sum(d["w"] for d in deltas) / 4)


# --- coupled losses -------------------------------------------------------------------
def _seg_batch(b=4, c=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    out = torch.randn(b, c, 5, 5, 3, generator=g, dtype=torch.float64)
    target = torch.randint(0, c, (b, 5, 5, 3), generator=g)
    return out, target


class TopKVoxelLoss(nn.Module):
    def forward(self, out, target):
        ce = F.cross_entropy(out, target, reduction="none").flatten()
        return ce.topk(ce.numel() // 10).values.mean()


def test_coupled_losses_are_refused_and_per_sample_ones_pass():
    monai = pytest.importorskip("monai")
    out, target = _seg_batch()
    onehot_target = target.unsqueeze(1)
    batch_dice = monai.losses.DiceLoss(to_onehot_y=True, softmax=True, batch=True)
    with pytest.raises(CoupledLossError, match="batch=True"):
        check_loss(batch_dice, out, onehot_target)
    # By the numbers too, without the name: the same loss behind a lambda.
    with pytest.raises(CoupledLossError, match="couples"):
        check_loss(lambda o, t: batch_dice(o, t), out, onehot_target)
    weighted = nn.CrossEntropyLoss(weight=torch.tensor([0.2, 1.0, 3.0], dtype=torch.float64))
    with pytest.raises(CoupledLossError, match="couples"):
        check_loss(weighted, out, target)
    ignoring = nn.CrossEntropyLoss(ignore_index=0)
    with pytest.raises(CoupledLossError, match="couples"):
        check_loss(ignoring, out, target)
    with pytest.raises(CoupledLossError, match="TopKVoxelLoss keeps the hardest"):
        check_loss(TopKVoxelLoss(), out, target)
    with pytest.raises(CoupledLossError, match="couples"):
        check_loss(lambda o, t: TopKVoxelLoss()(o, t), out, target)
    # Per-sample losses pass, with their reduction.
    check_loss(
        monai.losses.DiceLoss(to_onehot_y=True, softmax=True, batch=False), out, onehot_target
    )
    check_loss(DiceCELoss(), out, target)
    check_loss(DiceCELoss(reduction="sum"), out, target, loss_reduction="sum")
    check_loss(nn.CrossEntropyLoss(), out, target)
    # A mean loss declared as "sum" divides each unit by the batch's size: refused.
    with pytest.raises(CoupledLossError):
        check_loss(nn.CrossEntropyLoss(), out, target, loss_reduction="sum")


def test_coupling_inside_one_patient_is_allowed_across_patients_refused():
    out, target = _seg_batch(b=6)
    units = RowUnits((3, 3), "patient")

    def per_patient_pool(o, t):  # pools the rows of each patient of 3 rows, then averages
        ce = F.cross_entropy(o, t, reduction="none").flatten(1).mean(1)
        return torch.stack([ce[i : i + 3].max() for i in range(0, len(ce), 3)]).mean()

    check_loss(per_patient_pool, out, target, units)
    with pytest.raises(CoupledLossError, match="patients"):
        check_loss(per_patient_pool, out, target, RowUnits((2, 2, 2), "patient"))


class ForegroundNormalisedCE(nn.Module):
    """Cross-entropy over foreground voxels, divided by the batch's foreground count: each
    sample's weight depends on the others' labels. No attribute gives it away."""

    def forward(self, out, target):
        fg = (target > 0).to(out.dtype)
        return (F.cross_entropy(out, target, reduction="none") * fg).sum() / fg.sum().clamp_min(1)


def _criterion_args(model):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(8, 1, 4, 4, 2, dtype=torch.float64, generator=g)
    y = torch.randint(0, 2, (8, 4, 4, 2), generator=g)
    return dict(
        module=model, optimizer=torch.optim.SGD(model.parameters(), lr=1),
        data_loader=DataLoader(TensorDataset(x, y), batch_size=4), noise_multiplier=1.0,
        max_grad_norm=1.0, sample_rate=1.0, expected_batch_size=8,
    )  # fmt: skip


def test_make_private_checks_the_criterion_on_the_first_batch():
    monai = pytest.importorskip("monai")
    model = nn.Sequential(nn.Conv3d(1, 2, 1)).double()
    args = _criterion_args(model)
    with pytest.raises(CoupledLossError, match="batch=True"):
        _quiet(
            dpseg.PrivacyEngine(),
            criterion=monai.losses.DiceLoss(to_onehot_y=True, softmax=True, batch=True),
            **args,
        )
    # class weights under a mean: refused by what the loss is, before any batch
    weighted = nn.CrossEntropyLoss(weight=torch.tensor([0.1, 5.0], dtype=torch.float64))
    with pytest.raises(CoupledLossError, match="class weights"):
        _quiet(dpseg.PrivacyEngine(), criterion=weighted, **args)
    pmodel, opt, crit, loader = _quiet(
        dpseg.PrivacyEngine(), criterion=ForegroundNormalisedCE(), grad_sample_mode="ghost",
        **_criterion_args(model),
    )  # fmt: skip
    xb, yb = next(iter(loader))
    with pytest.raises(CoupledLossError, match="couples"):
        crit(pmodel(xb), yb)
    with pytest.warns(UserWarning, match="dpseg cannot see your loss"):
        dpseg.PrivacyEngine().make_private(**_criterion_args(model))


def test_plain_mode_checks_the_users_own_loss_object_where_the_loop_calls_it():
    """Plain mode returns no criterion: the loop calls the user's loss object itself. Its
    first call on a training batch is checked (a hook on it), then the hook goes away; a
    function passed as criterion cannot be watched, and the warning says so."""
    model = nn.Sequential(nn.Conv3d(1, 2, 1)).double()
    loss_fn = ForegroundNormalisedCE()
    pmodel, opt, loader = _quiet(dpseg.PrivacyEngine(), criterion=loss_fn, **_criterion_args(model))
    xb, yb = next(iter(loader))
    with torch.no_grad():  # a validation call is not a training batch: not checked
        loss_fn(pmodel(xb), yb)
    with pytest.raises(CoupledLossError, match="couples"):
        loss_fn(pmodel(xb), yb)
    # a per-sample loss passes its check and runs on, unhooked
    ce = nn.CrossEntropyLoss()
    pmodel, opt, loader = _quiet(dpseg.PrivacyEngine(), criterion=ce, **_criterion_args(model))
    for xb, yb in loader:
        opt.zero_grad()
        ce(pmodel(xb), yb).backward()
        opt.step()
    assert not ce._forward_hooks
    with pytest.warns(UserWarning, match="is a function, whose calls in your loop"):
        dpseg.PrivacyEngine().make_private(criterion=F.cross_entropy, **_criterion_args(model))


def test_check_loss_in_float64_low_precision_losses_and_the_reduction_it_was_told():
    """A weighted loss's float32 weights are taken to float64 with the outputs; a loss that
    computes in float32 whatever its input is held to float32's rounding, not float64's; a
    per-sample loss reduced the other way than declared is told so, not called coupled."""
    out, target = _seg_batch()
    w = torch.tensor([0.2, 1.0, 3.0])  # float32
    check_loss(nn.CrossEntropyLoss(weight=w, reduction="sum"), out.float(), target,
               loss_reduction="sum")  # fmt: skip

    def float32_ce(o, t):  # per sample, but computed in float32 (as MONAI's FocalLoss is)
        return F.cross_entropy(o.float(), t)

    for seed in range(5):
        out, target = _seg_batch(seed=seed)
        check_loss(float32_ce, out, target)
    with pytest.raises(CoupledLossError, match="couples"):  # float32 work, still coupled
        check_loss(lambda o, t: ForegroundNormalisedCE()(o.float(), t), out, target)
    monai = pytest.importorskip("monai")
    onehot = F.one_hot(target, 3).movedim(-1, 1).double()
    for seed in range(5):  # both cast to float32 inside (DiceFocal's result is float64)
        out, _ = _seg_batch(seed=seed)
        check_loss(monai.losses.FocalLoss(), out, onehot)
        check_loss(monai.losses.DiceFocalLoss(sigmoid=True), out, onehot)
    with pytest.raises(ReductionMismatchError, match="reduces the batch by 'sum'"):
        check_loss(nn.CrossEntropyLoss(reduction="sum"), out, target)
    with pytest.raises(ReductionMismatchError, match="reduces the batch by 'mean'"):
        check_loss(nn.CrossEntropyLoss(), out, target, loss_reduction="sum")
    # still refused as coupled when it is: a batch-normalised loss matches neither constant
    with pytest.raises(CoupledLossError, match="couples"):
        check_loss(ForegroundNormalisedCE(), out, target)
    ignoring = nn.CrossEntropyLoss(ignore_index=2)  # refused whatever this batch's labels
    with pytest.raises(CoupledLossError, match="ignore_index=2"):
        check_loss(ignoring, out, torch.zeros_like(target))


# --- shuffled batches -------------------------------------------------------------------
def test_shuffled_batches_are_never_accounted_as_poisson():
    x = torch.randn(40, 3)
    model = nn.Linear(3, 1)
    engine = dpseg.PrivacyEngine(accountant="prv")
    with pytest.warns(UserWarning, match="no amplification by subsampling is claimed"):
        pmodel, opt, loader = engine.make_private(
            module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
            data_loader=DataLoader(TensorDataset(x), batch_size=10, shuffle=True),
            noise_multiplier=1.0, max_grad_norm=1.0, poisson_sampling=False,
        )  # fmt: skip
    for _ in range(3):  # 3 passes of 4 batches
        for (xb,) in loader:
            opt.zero_grad()
            pmodel(xb).sum().backward()
            opt.step()
    spent = engine.get_privacy_spent(1e-5)
    assert spent["sampling"] == "shuffled" and spent["adjacency"] == "replace-one"
    assert spent["accountant"] == "shuffled-replace-one"
    # Three Gaussian releases of sensitivity 2C: mu = 2 sqrt(3) / sigma in GDP terms.
    from dpseg.audit.statistics import epsilon_of_gdp

    assert spent["epsilon"] == pytest.approx(epsilon_of_gdp(2 * math.sqrt(3), 1e-5), rel=2e-3)
    poisson = PRVAccountant()
    poisson.history = [(1.0, 0.25, 12)]
    assert spent["epsilon"] > 3 * poisson.get_epsilon(1e-5)  # never the Poisson figure


def test_shuffled_accountant_counts_passes_begun():
    acc = ShuffledAccountant()
    for _ in range(5):  # 5 steps of 4 a pass: 2 passes begun
        acc.step(noise_multiplier=2.0, sample_rate=0.25)
    from dpseg.audit.statistics import epsilon_of_gdp

    assert acc.get_epsilon(1e-5) == pytest.approx(
        epsilon_of_gdp(2 * math.sqrt(2) / 2, 1e-5), rel=2e-3
    )
    assert ReplaceOneAccountant().get_epsilon(1e-5) == 0.0


# --- parameters used outside their layer ------------------------------------------------
class TiedHead(nn.Module):
    """Uses head.weight inside head and again in a functional call (a tied projection)."""

    def __init__(self):
        super().__init__()
        self.body = nn.Linear(4, 3)
        self.head = nn.Linear(3, 3, bias=False)

    def forward(self, x):
        h = torch.tanh(self.body(x))
        return self.head(h) + F.linear(h, self.head.weight.t())


def test_a_weight_used_outside_its_layer_is_refused_where_its_gradient_arrives():
    torch.manual_seed(0)
    model = TiedHead().double()
    x = torch.randn(6, 4, dtype=torch.float64)
    pmodel, opt, _ = _quiet(
        dpseg.PrivacyEngine(), module=model, optimizer=torch.optim.SGD(model.parameters(), lr=1),
        data_loader=DataLoader(TensorDataset(x), batch_size=3), noise_multiplier=0.0,
        max_grad_norm=1.0,
    )  # fmt: skip
    with pytest.raises(EscapedGradientError, match="'head.weight'"):
        pmodel(x[:3]).pow(2).sum().backward()


def test_registering_the_tying_module_as_one_unit_makes_it_exact():
    from dpseg.privacy import register_functional_block

    class Tied(TiedHead):
        pass

    register_functional_block(Tied)
    torch.manual_seed(0)
    model = Tied().double()
    oracle = [p.detach().clone() for p in model.parameters()]
    x = torch.randn(6, 4, dtype=torch.float64)
    pmodel, opt, _ = _quiet(
        dpseg.PrivacyEngine(), module=model, optimizer=torch.optim.SGD(model.parameters(), lr=1),
        data_loader=DataLoader(TensorDataset(x), batch_size=6), noise_multiplier=0.0,
        max_grad_norm=0.5, loss_reduction="sum",
    )  # fmt: skip
    opt.zero_grad()
    pmodel(x).pow(2).sum().backward()
    opt.step()
    ref = Tied().double()
    with torch.no_grad():
        for p, v in zip(ref.parameters(), oracle, strict=True):
            p.copy_(v)
    _, summed = dp_sum(per_sample_grads(ref, lambda o, _y: o.pow(2).sum(), x, None), 0.5)
    for (name, p), start in zip(model.named_parameters(), oracle, strict=True):
        torch.testing.assert_close(start - p.detach(), summed[name], rtol=1e-9, atol=1e-12)


def test_a_loop_without_zero_grad_raises_nothing_false():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 1)).double()
    x = torch.randn(12, 4, dtype=torch.float64)
    pmodel, opt, loader = _quiet(
        dpseg.PrivacyEngine(), module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        data_loader=DataLoader(TensorDataset(x), batch_size=4), noise_multiplier=0.5,
        max_grad_norm=1.0,
    )  # fmt: skip
    for (xb,) in loader:  # never zero_grad: last step's p.grad stays, and is overwritten
        pmodel(xb).sum().backward()
        opt.step()
    assert opt.steps_taken == len(loader)


# --- seeds --------------------------------------------------------------------------------
def test_torch_manual_seed_makes_a_run_reproducible_as_in_opacus():
    def run():
        torch.manual_seed(123)
        model = nn.Linear(4, 2)
        x = torch.randn(20, 4)
        pmodel, opt, loader = _quiet(
            dpseg.PrivacyEngine(), module=model,
            optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
            data_loader=DataLoader(TensorDataset(x), batch_size=5), noise_multiplier=1.0,
            max_grad_norm=1.0,
        )  # fmt: skip
        for (xb,) in loader:
            opt.zero_grad()
            pmodel(xb).sum().backward()
            opt.step()
        return torch.cat([p.detach().flatten() for p in model.parameters()])

    assert torch.equal(run(), run())


def test_sampling_plan_names_what_it_read():
    x = TensorDataset(torch.zeros(30, 2))
    declared = plan_sampling(DataLoader(x, batch_size=5), sample_rate=0.2, expected_batch_size=6)
    assert (declared.adjacency, declared.steps_per_epoch, declared.expected_batch_size) == (
        "add/remove", 5, 6,
    )  # fmt: skip
    derived = plan_sampling(DataLoader(x, batch_size=5))
    assert derived.adjacency == "replace-one" and derived.sample_rate == pytest.approx(1 / 6)
    rate_only = plan_sampling(DataLoader(x, batch_size=5), sample_rate=0.2)
    assert rate_only.adjacency == "replace-one"  # the normaliser still read N
    summed = plan_sampling(DataLoader(x, batch_size=5), sample_rate=0.2, loss_reduction="sum")
    assert summed.adjacency == "add/remove"  # no normaliser under "sum"


def test_a_federated_site_with_a_declared_rate_reads_nothing_of_its_size():
    from dpseg.federated.site import Site, SiteConfig

    def site(n):
        data = TensorDataset(torch.randn(n, 1, 4, 4, 2), torch.randint(0, 2, (n, 4, 4, 2)))
        cfg = SiteConfig(engine="dpseg", batch_size=3, sample_rate=0.25, optimizer="sgd")
        return Site("s", 0, data, lambda: nn.Sequential(nn.Conv3d(1, 2, 1)), cfg)

    a, b = site(12), site(13)
    for s in (a, b):
        assert s.ledger.accountant.mechanism() == "prv"  # add/remove: Opacus's own
    assert (a.sample_rate, a.steps_per_epoch, a.optimizer.expected_batch_size) == (
        b.sample_rate, b.steps_per_epoch, b.optimizer.expected_batch_size,
    ) == (0.25, 4, 3)  # fmt: skip


def test_the_precision_allowance_counts_the_gradient_path_only():
    """A half-precision mask or an unused bfloat16 tensor inside a loss does not loosen the
    check (they are off the output's gradient path); a loss whose gradient path is below
    float32 is refused with that reason, since its rounding hides couplings."""
    out, target = _seg_batch()

    class HalfMask(nn.Module):
        def forward(self, out, target):
            fg = (target > 0).half().to(out.dtype)  # exact 0/1, made in half precision
            unused = torch.zeros(1, dtype=torch.bfloat16)  # noqa: F841
            ce = F.cross_entropy(out, target, reduction="none")
            return (ce * fg).sum() / fg.sum().clamp_min(1)

    with pytest.raises(CoupledLossError, match="couples"):
        check_loss(HalfMask(), out, target)
    with pytest.raises(CoupledLossError, match="below float32"):
        check_loss(lambda o, t: ForegroundNormalisedCE()(o.bfloat16(), t).double(), out, target)


class _Masked(nn.Module):
    """A per-sample loss with a third argument: each sample's CE over its own mask."""

    def forward(self, out, target, mask):
        ce = (F.cross_entropy(out, target, reduction="none") * mask).flatten(1)
        return (ce.sum(1) / mask.flatten(1).sum(1).clamp_min(1)).mean()


def test_plain_mode_reads_the_call_however_it_is_made():
    """The hook reads (output, target) from keyword calls and carries a loss's other
    arguments into the check, cut by rows; a call it cannot read is warned about, not
    passed in silence; a second make_private replaces the first one's hook."""
    model = nn.Sequential(nn.Conv3d(1, 2, 1)).double()
    coupled = ForegroundNormalisedCE()
    pmodel, opt, loader = _quiet(dpseg.PrivacyEngine(), criterion=coupled, **_criterion_args(model))
    xb, yb = next(iter(loader))
    with pytest.raises(CoupledLossError, match="couples"):
        coupled(out=pmodel(xb), target=yb)
    masked = _Masked()
    for _ in range(2):
        pmodel, opt, loader = _quiet(
            dpseg.PrivacyEngine(), criterion=masked, **_criterion_args(model)
        )
    assert len(masked._forward_hooks) == 1
    for xb, yb in loader:
        opt.zero_grad()
        masked(pmodel(xb), yb, (yb > 0).double()).backward()  # per sample: passes, trains
        opt.step()
    assert not masked._forward_hooks

    class Star(nn.Module):
        def forward(self, *args):
            return ForegroundNormalisedCE()(*args)

    star = Star()
    pmodel, opt, loader = _quiet(dpseg.PrivacyEngine(), criterion=star, **_criterion_args(model))
    xb, yb = next(iter(loader))
    with pytest.warns(UserWarning, match="could not read"):
        star(pmodel(xb), yb)


def test_a_loss_that_cannot_be_copied_is_checked_in_its_own_dtype():
    import threading

    class Locked(nn.Module):
        def __init__(self):
            super().__init__()
            self.lock = threading.Lock()  # deepcopy fails on it
            self.ce = nn.CrossEntropyLoss(weight=torch.tensor([0.5, 2.0]), reduction="sum")

        def forward(self, out, target):
            return self.ce(out, target)

    g = torch.Generator().manual_seed(0)
    out = torch.randn(4, 2, 3, 3, 3, generator=g)
    target = torch.randint(0, 2, (4, 3, 3, 3), generator=g)
    check_loss(Locked(), out, target, loss_reduction="sum")
