"""Opacus's calls that dpseg answers: grad_sample_mode and criterion (ghost mode),
ModuleValidator, save_checkpoint / load_checkpoint, the "gdp" accountant."""

from __future__ import annotations

import ast
import copy
import subprocess
import sys
from pathlib import Path

import opacus
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import dpseg
from dpseg.privacy import PrivacyModelError
from dpseg.validators import ModuleValidator
from tests.oracle import dp_sum, per_sample_grads
from tests.test_engine_oracle import SmallSegNet, seg_loss_mean

ROOT = Path(__file__).resolve().parents[1]


def _loader(n=6, batch=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 4, 4, 2, generator=g, dtype=torch.float64)
    y = torch.randint(0, 2, (n, 4, 4, 2), generator=g)
    return DataLoader(TensorDataset(x, y), batch_size=batch)


def _make(model, engine=None, **kw):
    """make_private on 6 patients in batches of 3, q = 1/2 and the normaliser 3 declared
    (add/remove adjacency, so Opacus's own accountants apply)."""
    engine = engine or dpseg.PrivacyEngine(accountant="rdp")
    args = dict(
        module=model,
        optimizer=torch.optim.SGD(model.parameters(), lr=1.0),
        data_loader=_loader(),
        noise_multiplier=0.0,
        max_grad_norm=1.0,
        sample_rate=0.5,
        expected_batch_size=3,
    )
    args.update(kw)
    return engine, engine.make_private(**args)


@pytest.mark.parametrize("mode", ["hooks", "functorch", "ew"])
def test_opacus_grad_sample_modes_run_dpseg_capture_with_one_warning(mode):
    with pytest.warns(UserWarning, match="own capture") as record:
        _, out = _make(SmallSegNet().double(), grad_sample_mode=mode)
    assert len([w for w in record if "own capture" in str(w.message)]) == 1
    model, opt, loader = out
    assert isinstance(model, dpseg.privacy.PrivateModule)


@pytest.mark.parametrize("mode", ["ghost_fsdp", "no_op", "expanded_weights", "Hooks"])
def test_other_grad_sample_modes_are_refused_by_name(mode):
    with pytest.raises(ValueError, match=f"grad_sample_mode={mode!r}"):
        _make(SmallSegNet().double(), grad_sample_mode=mode)


def test_ghost_mode_returns_the_criterion_and_matches_the_oracle_on_a_per_voxel_loss():
    torch.manual_seed(2)
    model = SmallSegNet().double()
    oracle = copy.deepcopy(model)
    with pytest.warns(UserWarning, match="own capture"):
        _, out = _make(
            model, grad_sample_mode="ghost", criterion=nn.CrossEntropyLoss(), max_grad_norm=0.02
        )
    pmodel, opt, criterion, loader = out
    x, y = loader.dataset.tensors
    x, y = x[:3], y[:3]
    before = torch.cat([p.detach().flatten() for p in model.parameters()])
    opt.zero_grad()
    loss = criterion(pmodel(x), y)  # CrossEntropyLoss over (B, C, D, H, W): mean over voxels
    assert loss.dim() == 0
    loss.backward()
    opt.step()
    got = before - torch.cat([p.detach().flatten() for p in model.parameters()])
    norms, summed = dp_sum(per_sample_grads(oracle, seg_loss_mean, x, y), 0.02)
    assert (norms > 0.02).all()  # every sample clipped: the clip acts on the per-voxel mean
    expected = torch.cat([summed[n].flatten() / 3 for n, _ in oracle.named_parameters()])
    assert (got - expected).abs().max() <= 1e-9 * expected.abs().max()


def test_ghost_mode_defaults_to_cross_entropy_and_checks_the_reduction():
    with pytest.warns(UserWarning):
        _, out = _make(SmallSegNet().double(), grad_sample_mode="ghost")
    assert isinstance(out[2].criterion, nn.CrossEntropyLoss) and len(out) == 4
    for crit, reduction, message in [
        (nn.CrossEntropyLoss(reduction="sum"), "mean", "reduces with 'sum'"),
        (nn.CrossEntropyLoss(reduction="none"), "mean", "reduction='none'"),
    ]:
        with pytest.raises(ValueError, match=message), pytest.warns(UserWarning):
            _make(
                SmallSegNet().double(),
                grad_sample_mode="ghost",
                criterion=crit,
                loss_reduction=reduction,
            )
    with pytest.warns(UserWarning):
        _, out = _make(
            SmallSegNet().double(),
            grad_sample_mode="ghost",
            criterion=lambda out, y: nn.functional.cross_entropy(out, y, reduction="none"),
        )
    pmodel, _, criterion, loader = out
    x, y = loader.dataset.tensors
    with pytest.raises(ValueError, match="not a scalar loss"):
        criterion(pmodel(x[:2]), y[:2])


def test_criterion_is_accepted_in_every_mode():
    # Opacus passes a criterion to make_private in all modes; only ghost returns it.
    _, out = _make(SmallSegNet().double(), criterion=nn.CrossEntropyLoss())
    assert len(out) == 3


# ---------------------------------------------------------------------------------------
# ModuleValidator


def test_module_validator_on_batchnorm():
    net = nn.Sequential(nn.Conv3d(1, 8, 3), nn.BatchNorm3d(8), nn.ReLU(), nn.Conv3d(8, 2, 1))
    errors = ModuleValidator.validate(net, strict=False)
    assert len(errors) == 1 and "normalises over the batch" in str(errors[0])
    assert not ModuleValidator.is_valid(net)
    with pytest.raises(PrivacyModelError, match="normalises over the batch"):
        ModuleValidator.validate(net, strict=True)
    fixed = ModuleValidator.fix(net)
    assert isinstance(fixed[1], nn.GroupNorm) and isinstance(net[1], nn.BatchNorm3d)
    assert ModuleValidator.validate(fixed) == [] and ModuleValidator.is_valid(fixed)
    assert ModuleValidator.fix_and_validate(net)[1].num_groups == 8


def test_module_validator_on_instance_norm_with_running_stats():
    net = nn.Sequential(
        nn.Conv3d(1, 4, 3), nn.InstanceNorm3d(4, affine=True, track_running_stats=True)
    )
    errors = ModuleValidator.validate(net)
    assert len(errors) == 1 and "running statistics" in str(errors[0])
    # make_private refuses it too: the running means are data, released without noise.
    with pytest.raises(PrivacyModelError, match="running statistics"):
        _make(copy.deepcopy(net).double())
    fixed = ModuleValidator.fix(net)
    assert not fixed[1].track_running_stats and fixed[1].running_mean is None
    assert "running_mean" not in fixed.state_dict()
    assert ModuleValidator.is_valid(fixed) and net[1].track_running_stats  # a copy
    x = torch.randn(2, 1, 5, 5, 5)
    torch.testing.assert_close(  # now normalised by each sample's own statistics
        fixed(x), nn.functional.instance_norm(net[0](x), weight=net[1].weight, bias=net[1].bias)
    )


def test_module_validator_on_a_valid_net_and_an_unfixable_one():
    from dpseg.models import UNet

    net = UNet(3, 1, 2, channels=(4, 8), norm="instance")
    assert ModuleValidator.validate(net) == [] and ModuleValidator.is_valid(net)
    assert ModuleValidator.fix(net) is not net

    attention = nn.Sequential(nn.MultiheadAttention(8, 2))  # (sequence, batch, features)
    with pytest.raises(PrivacyModelError, match="batch_first=True"):
        ModuleValidator.fix_and_validate(attention)
    assert ModuleValidator.is_valid(nn.MultiheadAttention(8, 2, batch_first=True))


# ---------------------------------------------------------------------------------------
# Checkpoints


def _train(engine, model, opt, loader, steps):
    it = iter(loader)
    for _ in range(steps):
        x, y = next(it)
        opt.zero_grad()
        seg_loss_mean(model(x), y).backward()
        opt.step()


def test_checkpoint_round_trip_keeps_weights_epsilon_and_the_noise_counter(tmp_path):
    torch.manual_seed(0)
    base = SmallSegNet().double()
    kw = dict(noise_multiplier=1.0, noise_seed=4, poisson_sampling=False)

    # Uninterrupted: 2 steps, then 1 more.
    engine, (model, opt, loader) = _make(copy.deepcopy(base), **kw)
    _train(engine, model, opt, loader, 2)
    after_two = {k: v.clone() for k, v in model.state_dict().items()}
    engine.save_checkpoint(
        path=tmp_path / "ckpt.pt", module=model, optimizer=opt, checkpoint_dict={"epoch": 7}
    )
    saved = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    assert {"module_state_dict", "optimizer_state_dict", "privacy_accountant_state_dict"} <= set(
        saved
    )
    eps = engine.get_epsilon(1e-5)
    _train(engine, model, opt, loader, 1)
    uninterrupted = _flat_state(model)
    step3 = uninterrupted - _flat_dict(after_two)

    # Resumed from the checkpoint into fresh objects, with the same noise_seed given again.
    engine2, (model2, opt2, loader2) = _make(SmallSegNet().double(), **kw)
    rest = engine2.load_checkpoint(path=tmp_path / "ckpt.pt", module=model2, optimizer=opt2)
    assert rest == {"epoch": 7}
    assert all(torch.equal(v, after_two[k]) for k, v in model2.state_dict().items())
    assert engine2.get_epsilon(1e-5) == eps > 0 and opt2.steps_taken == 2
    _train(engine2, model2, opt2, loader2, 1)
    assert torch.equal(_flat_state(model2), uninterrupted)  # step 3's noise, not step 0's

    # A fresh run with that seed (no checkpoint) draws step 0's noise: a different update.
    engine3, (model3, opt3, loader3) = _make(SmallSegNet().double(), **kw)
    model3.load_state_dict(after_two)
    _train(engine3, model3, opt3, loader3, 1)
    step0_noise_update = _flat_state(model3) - _flat_dict(after_two)
    assert (step0_noise_update - step3).abs().max() > 1e-3


def _flat_state(model):
    return _flat_dict(model.state_dict())


def _flat_dict(state):
    return torch.cat([v.flatten() for v in state.values() if v.is_floating_point()])


def test_checkpoint_needs_the_optimizer_and_never_falls_behind_the_ledger(tmp_path):
    engine, (model, opt, loader) = _make(SmallSegNet().double(), noise_multiplier=1.0)
    with pytest.raises(TypeError, match="same noise twice"):
        engine.save_checkpoint(path=tmp_path / "c.pt", module=model, optimizer=None)
    with pytest.raises(TypeError, match="DPOptimizer"):
        engine.save_checkpoint(
            path=tmp_path / "c.pt", module=model, optimizer=torch.optim.SGD(model.parameters())
        )
    _train(engine, model, opt, loader, 2)
    # An Opacus-style checkpoint without dpseg's counter: the counter follows the ledger.
    torch.save(
        {
            "module_state_dict": model.state_dict(),
            "privacy_accountant_state_dict": engine.accountant.state_dict(),
            "optimizer_state_dict": opt.original_optimizer.state_dict(),
        },
        tmp_path / "opacus.pt",
    )
    engine2, (model2, opt2, _) = _make(SmallSegNet().double(), noise_multiplier=1.0)
    engine2.load_checkpoint(path=tmp_path / "opacus.pt", module=model2, optimizer=opt2)
    assert opt2.steps_taken == 2 and engine2.get_epsilon(1e-5) == engine.get_epsilon(1e-5)
    with pytest.raises(ValueError, match="accountant='rdp'"):
        dpseg.PrivacyEngine(accountant="prv").load_checkpoint(
            path=tmp_path / "opacus.pt", module=model2, optimizer=opt2
        )


# ---------------------------------------------------------------------------------------
# The "gdp" accountant


def test_gdp_accountant_warns_and_matches_opacus():
    with pytest.warns(UserWarning, match="underestimate") as record:
        engine = dpseg.PrivacyEngine(accountant="gdp")
    assert "constant" in str(record[0].message)
    _, (model, opt, loader) = _make(SmallSegNet().double(), engine, noise_multiplier=1.3)
    _train(engine, model, opt, loader, 2)
    with pytest.warns(UserWarning):
        ref = opacus.accountants.GaussianAccountant()
    for _ in range(2):
        ref.step(noise_multiplier=1.3, sample_rate=0.5)
    assert engine.get_epsilon(1e-5) == pytest.approx(ref.get_epsilon(1e-5), rel=1e-12)
    opt.noise_multiplier = 2.0
    with pytest.raises(ValueError, match="constant"):
        _train(engine, model, opt, loader, 1)


# ---------------------------------------------------------------------------------------
# Import structure: no module imports the module that imports it.


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against the package
                pkg = ".".join(path.relative_to(ROOT).with_suffix("").parts[: -node.level])
                base = f"{pkg}.{base}" if base else pkg
            names |= {base} | {f"{base}.{a.name}" for a in node.names}
    return names


def test_subcommands_do_not_import_the_cli_and_dispatch_does_not_import_its_backends():
    for path in (ROOT / "dpseg").rglob("*.py"):
        if path.name == "__main__.py" or path == ROOT / "dpseg" / "cli.py":
            continue
        assert "dpseg.cli" not in _imports(path), path
    assert not any("triton_backend" in n for n in _imports(ROOT / "dpseg/ops/dispatch.py"))
    code = "import dpseg.federated.cli, dpseg.train.cli, dpseg.attack.cli, sys; " + (
        "assert 'dpseg.cli' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)
