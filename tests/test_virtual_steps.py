"""Virtual steps (BatchMemoryManager) and the refusal of plain gradient accumulation, held
against the float64 microbatch oracle."""

from __future__ import annotations

import copy
import math
import warnings

import opacus
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

import dpseg
from dpseg.privacy import PendingGradientsError
from dpseg.utils.batch_memory_manager import BatchMemoryManager
from tests.oracle import dp_sum, per_sample_grads
from tests.test_engine_oracle import SmallSegNet, seg_loss_mean, seg_loss_sum

RTOL = 1e-9  # float64 throughout


def _flat(model) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def _data(n: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 4, 4, 2, generator=g, dtype=torch.float64)
    y = torch.randint(0, 2, (n, 4, 4, 2), generator=g)
    return x, y


def _private(model, x, y, batch, *, reduction="mean", sigma=0.0, C=1.0, poisson=True, seed=3):
    """make_private over a dataset that also yields each item's index."""
    data = TensorDataset(x, y, torch.arange(len(x)))
    engine = dpseg.PrivacyEngine(accountant="rdp")
    pmodel, opt, loader = engine.make_private(
        module=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=1.0),
        data_loader=DataLoader(data, batch_size=batch),
        noise_multiplier=sigma,
        max_grad_norm=C,
        loss_reduction=reduction,
        poisson_sampling=poisson,
        noise_seed=seed,
    )
    return engine, pmodel, opt, loader


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("poisson", [True, False])
@pytest.mark.parametrize("physical", [1, 2, 3])
def test_batch_memory_manager_update_matches_the_oracle(reduction, poisson, physical):
    # 11 patients, loader batch 4: q = 1/3, expected logical batch int(11/3) = 3; logical
    # batches of 4, 4, 3 without Poisson (3 at physical 2 splits 2 + 1, 4 at 3 splits 3 + 1).
    torch.manual_seed(5)
    x, y = _data(11)
    model = SmallSegNet().double()
    oracle_model = copy.deepcopy(model)
    loss_fn = seg_loss_mean if reduction == "mean" else seg_loss_sum
    engine, pmodel, opt, loader = _private(model, x, y, 4, reduction=reduction, poisson=poisson)
    # C between the smallest and largest per-sample norm: some samples clipped, some not.
    norms, _ = dp_sum(per_sample_grads(oracle_model, seg_loss_mean, x, y), 1.0)
    opt.max_grad_norm = C = float(norms.median())
    scale = 1 / opt.expected_batch_size if reduction == "mean" else 1.0
    assert opt.expected_batch_size == 3

    logical_batches, physical_sizes, seen, start = 0, [], [], None
    with BatchMemoryManager(
        data_loader=loader, max_physical_batch_size=physical, optimizer=opt
    ) as phys:
        for xb, yb, idx in phys:
            assert len(xb) <= physical
            if start is None:
                start = _flat(model)
            opt.zero_grad()
            loss_fn(pmodel(xb), yb).backward()
            steps = opt.steps_taken
            opt.step()
            seen.append(idx)
            physical_sizes.append(len(idx))
            if opt.steps_taken == steps:  # a skipped step: nothing is released
                assert torch.equal(_flat(model), start)
                continue
            assert opt.steps_taken == steps + 1
            logical_batches += 1
            members = torch.cat(seen)
            _, summed = dp_sum(
                per_sample_grads(oracle_model, seg_loss_mean, x[members], y[members]), C
            )
            expected = torch.cat(
                [scale * summed[n].flatten() for n, _ in oracle_model.named_parameters()]
            )
            got = start - _flat(model)
            err = (got - expected).abs().max()
            assert err <= RTOL * max(expected.abs().max(), 1e-300) or err < 1e-15, float(err)
            assert len(opt.last_per_sample_norms) == len(members)
            with torch.no_grad():  # the oracle's model follows the same update
                for p, q in zip(oracle_model.parameters(), model.parameters(), strict=True):
                    p.copy_(q)
            seen, start = [], None
    assert logical_batches == len(loader) == 3
    assert opt.steps_taken == 3
    assert engine.accountant.history == [(0.0, 1 / 3, 3)]  # one accountant step per logical batch
    if not poisson:
        want = {1: [1] * 11, 2: [2, 2, 2, 2, 2, 1], 3: [3, 1, 3, 1, 3]}[physical]
        assert physical_sizes == want


def test_virtual_step_draws_the_noise_of_one_plain_step():
    # The same logical batch of 5 as one physical batch and as 2 + 2 + 1: one noise draw,
    # scaled once, keyed by the same step: the same update.
    x, y = _data(5, seed=1)
    base = SmallSegNet().double()
    updates = {}
    for physical in (5, 2):
        model = copy.deepcopy(base)
        _, pmodel, opt, loader = _private(model, x, y, 5, sigma=0.8, C=0.05, poisson=False, seed=9)
        with BatchMemoryManager(
            data_loader=loader, max_physical_batch_size=physical, optimizer=opt
        ) as phys:
            for xb, yb, _ in phys:
                opt.zero_grad()
                seg_loss_mean(pmodel(xb), yb).backward()
                opt.step()
        assert opt.steps_taken == 1
        updates[physical] = _flat(base) - _flat(model)
    torch.testing.assert_close(updates[2], updates[5], rtol=1e-12, atol=1e-15)
    assert updates[5].abs().min() > 0  # the noise is there: every coordinate moved


def test_empty_logical_batch_is_one_noise_only_step():
    x, y = _data(6)
    model = SmallSegNet().double()
    data = TensorDataset(x, y)
    engine = dpseg.PrivacyEngine(accountant="rdp")
    pmodel, opt, loader = engine.make_private(
        module=model, optimizer=torch.optim.SGD(model.parameters(), lr=1.0),
        data_loader=DataLoader(data, batch_size=6), noise_multiplier=1.0, max_grad_norm=1.0,
        noise_seed=0,
    )  # fmt: skip
    loader.batch_sampler.sample_rate = 1e-12  # every logical batch empty
    before = _flat(model)
    with BatchMemoryManager(data_loader=loader, max_physical_batch_size=2, optimizer=opt) as phys:
        batches = list(phys)
        assert [len(b[0]) for b in batches] == [0]
        xb, yb = batches[0]
        opt.zero_grad()
        pmodel(xb).sum().backward()
        opt.step()
    assert opt.steps_taken == 1 and len(engine.accountant.history) == 1
    assert (_flat(model) - before).abs().min() > 0  # every parameter got noise


def test_leaving_mid_logical_batch_drops_what_was_accumulated():
    x, y = _data(8)
    model = SmallSegNet().double()
    _, pmodel, opt, loader = _private(model, x, y, 8, poisson=False)
    before = _flat(model)
    with pytest.warns(UserWarning, match="dropped without an update"):
        with BatchMemoryManager(
            data_loader=loader, max_physical_batch_size=3, optimizer=opt
        ) as phys:
            for xb, yb, _ in phys:
                opt.zero_grad()
                seg_loss_mean(pmodel(xb), yb).backward()
                opt.step()
                break
    assert not opt.accumulating and opt.steps_taken == 0
    assert torch.equal(_flat(model), before)
    # The next plain step is that batch alone, not merged with the dropped one.
    opt.zero_grad()
    seg_loss_mean(pmodel(x[:2]), y[:2]).backward()
    opt.step()
    assert len(opt.last_per_sample_norms) == 2


def test_workers_prefetching_cannot_shift_the_end_of_a_logical_batch():
    # With workers the sampler runs ahead of the loop; the end flags are read as batches
    # arrive, so the update still happens exactly at the last physical batch.
    x, y = _data(7)
    model = SmallSegNet().double()
    _, pmodel, opt, loader = _private(model, x, y, 7, poisson=False)
    loader = DataLoader(loader.dataset, batch_size=7, num_workers=2, prefetch_factor=4)
    steps = []
    with BatchMemoryManager(data_loader=loader, max_physical_batch_size=2, optimizer=opt) as phys:
        for xb, yb, _ in phys:
            opt.zero_grad()
            seg_loss_mean(pmodel(xb), yb).backward()
            opt.step()
            steps.append(opt.steps_taken)
    assert steps == [0, 0, 0, 1]


def test_batch_memory_manager_boundary_checks():
    x, y = _data(4)
    model = SmallSegNet().double()
    _, _, opt, loader = _private(model, x, y, 2)
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="max_physical_batch_size must be an int >= 1"):
            BatchMemoryManager(data_loader=loader, max_physical_batch_size=bad, optimizer=opt)
    with pytest.raises(TypeError, match="PrivacyEngine.make_private"):
        BatchMemoryManager(
            data_loader=loader, max_physical_batch_size=2,
            optimizer=torch.optim.SGD(model.parameters(), lr=1),
        )  # fmt: skip
    assert dpseg.BatchMemoryManager is BatchMemoryManager


def test_physical_batch_count_is_exact_for_fixed_batches():
    x, y = _data(11)
    _, _, opt, loader = _private(SmallSegNet().double(), x, y, 4, poisson=False)
    with BatchMemoryManager(data_loader=loader, max_physical_batch_size=3, optimizer=opt) as phys:
        assert len(phys) == len(list(phys)) == 5  # 4 -> 3 + 1, 4 -> 3 + 1, 3


# ---------------------------------------------------------------------------------------
# Plain accumulation is refused; what was exact stays exact.


def test_two_batches_accumulated_before_one_step_are_refused():
    x, y = _data(4)
    model = SmallSegNet().double()
    _, pmodel, opt, _ = _private(model, x, y, 2)
    opt.zero_grad()
    seg_loss_mean(pmodel(x[:2]), y[:2]).backward()
    with pytest.raises(PendingGradientsError, match="BatchMemoryManager"):
        pmodel(x[2:])
    with torch.no_grad():  # evaluating in between makes no per-sample gradient: allowed
        pmodel(x[2:])
    opt.step()
    pmodel(x[2:])  # after the step: a new batch


def test_two_forwards_then_two_backwards_are_refused():
    x, y = _data(4)
    model = SmallSegNet().double()
    _, pmodel, opt, _ = _private(model, x, y, 2)
    loss_a = seg_loss_mean(pmodel(x[:2]), y[:2])
    loss_b = seg_loss_mean(pmodel(x[2:]), y[2:])
    loss_a.backward()
    with pytest.raises(RuntimeError, match="two different forward passes"):
        loss_b.backward()


def test_a_submodule_called_twice_outside_the_model_is_not_merged():
    x, y = _data(4)
    model = SmallSegNet().double()
    _, pmodel, _, _ = _private(model, x, y, 2)
    conv = pmodel._module.enc
    out = conv(x[:2]).sum() + conv(x[2:]).sum()
    with pytest.raises(RuntimeError, match="two different forward passes"):
        out.backward()


def _update_of(model, pmodel, opt, run):
    before = _flat(model)
    opt.zero_grad()
    run()
    opt.step()
    return before - _flat(model)


def test_weight_sharing_and_two_backwards_from_one_forward_stay_exact():
    class Shared(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv3d(1, 1, 3, padding=1)
            self.head = torch.nn.Conv3d(1, 2, 1)

        def forward(self, x):
            return self.head(torch.tanh(self.conv(torch.tanh(self.conv(x)))))

    x, y = _data(3, seed=2)
    for model in (Shared().double(), SmallSegNet().double()):
        oracle = copy.deepcopy(model)
        _, pmodel, opt, _ = _private(model, x, y, 3, C=1e3)  # nothing clipped: the sum itself

        def two_backwards(pmodel=pmodel):
            out = pmodel(x)
            seg_loss_mean(out, y).backward(retain_graph=True)
            (out**2).mean().backward()

        got = _update_of(model, pmodel, opt, two_backwards)

        def both(pred, t):
            return seg_loss_mean(pred, t) + (pred**2).mean()

        _, summed = dp_sum(per_sample_grads(oracle, both, x, y), 1e3)
        # Each sample's loss is a mean over its voxels; the batch mean divides by 3 = E[B]
        # (q = 1, expected batch 3).
        expected = torch.cat([summed[n].flatten() / 3 for n, _ in oracle.named_parameters()])
        assert (got - expected).abs().max() <= RTOL * expected.abs().max()


def test_opacus_batch_memory_manager_path_still_works_for_opacus():
    # The Opacus optimizer is refused with a pointer to Opacus's own manager.
    x, y = _data(4)
    model = SmallSegNet().double()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _, opt, loader = opacus.PrivacyEngine().make_private(
            module=model, optimizer=torch.optim.SGD(model.parameters(), lr=1),
            data_loader=DataLoader(TensorDataset(x, y), batch_size=2), noise_multiplier=1.0,
            max_grad_norm=1.0,
        )  # fmt: skip
    with pytest.raises(TypeError, match="opacus.utils.batch_memory_manager"):
        BatchMemoryManager(data_loader=loader, max_physical_batch_size=2, optimizer=opt)


def test_expected_physical_batch_count_for_poisson():
    x, y = _data(40)
    _, _, opt, loader = _private(SmallSegNet().double(), x, y, 10)  # q = 1/4, E[B] = 10
    with BatchMemoryManager(data_loader=loader, max_physical_batch_size=3, optimizer=opt) as phys:
        assert len(phys) == 4 * math.ceil(10 / 3)
