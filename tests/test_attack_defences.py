"""Defended updates as a dpseg site shares them, and the `dpseg attack` command."""

import argparse
import json
import math

import numpy as np
import pytest
import torch

from dpseg.attack import defences as dfn
from dpseg.attack.cli import add_attack_parser
from dpseg.cli_types import UsageError
from dpseg.models import UNet
from dpseg.train.losses import DiceCELoss


def _norm(update):
    return math.sqrt(sum(float(t.double().norm()) ** 2 for t in update))


def _setup(b=3, size=16):
    g = torch.Generator().manual_seed(b)
    x = torch.rand(b, 1, size, size, generator=g)
    y = (torch.rand(b, size, size, generator=g) > 0.5).long()
    return UNet(2, 1, 2, channels=(4, 8), seed=2), DiceCELoss(), x, y


@pytest.mark.parametrize(
    "spec, expect",
    [
        ("none", (0.0, None)),
        ("clip", (0.0, 1.0)),
        ("clip:0.5", (0.0, 0.5)),
        ("dp:1.0", (1.0, 1.0)),
        ("dp:0.1:2", (0.1, 2.0)),
        ("dp:1e-1", (0.1, 1.0)),
    ],
)
def test_parse_defence(spec, expect):
    d = dfn.parse_defence(spec)
    assert (d.noise_multiplier, d.max_grad_norm) == expect and d.name == spec


@pytest.mark.parametrize("spec", ["dp:abc", "dp", "dp:-1", "clip:0", "noise", "dp:1:0", ""])
def test_parse_defence_rejects(spec):
    with pytest.raises(ValueError):
        dfn.parse_defence(spec)


def test_clip_bounds_the_norm():
    model, loss, x, y = _setup(b=1)
    plain = dfn.shared_update(model, loss, x, y, dfn.parse_defence("none"))
    c = 0.3 * _norm(plain)  # so that clipping binds
    clipped = dfn.shared_update(model, loss, x, y, dfn.parse_defence(f"clip:{c}"))
    assert _norm(clipped) <= c * (1 + 1e-5)
    # Batch of 1: clipping only rescales; the direction (all an attack uses) is unchanged.
    cos = sum(float((a * b).sum()) for a, b in zip(plain, clipped, strict=True)) / (
        _norm(plain) * _norm(clipped)
    )
    assert cos == pytest.approx(1.0, abs=1e-5)


@pytest.mark.parametrize("sigma, b", [(0.5, 3), (1.0, 1)])
def test_dp_noise_has_the_expected_std(sigma, b):
    model, loss, x, y = _setup(b=b)
    clipped = dfn.shared_update(model, loss, x, y, dfn.parse_defence("clip"), seed=5)
    noisy = dfn.shared_update(model, loss, x, y, dfn.parse_defence(f"dp:{sigma}"), seed=5)
    noise = torch.cat([(n - c).flatten() for n, c in zip(noisy, clipped, strict=True)]).double()
    # (sum_b clip(g_b) + N(0, sigma^2 C^2)) / B with C = 1: std sigma / B. ~1.7k samples:
    # the sample std is within 6% of the truth with probability > 0.99.
    assert float(noise.std()) == pytest.approx(sigma / b, rel=0.06)
    assert abs(float(noise.mean())) < 4 * sigma / b / math.sqrt(noise.numel())
    again = dfn.shared_update(model, loss, x, y, dfn.parse_defence(f"dp:{sigma}"), seed=5)
    assert all(
        torch.equal(a, c) for a, c in zip(again, noisy, strict=True)
    )  # noise keyed by the seed


def test_random_update_keeps_norms():
    ref = [torch.randn(4, 3) * 5, torch.randn(7) * 0.1]
    per_layer = dfn.random_update(ref, seed=0, per_layer=True)
    assert [float(t.norm()) for t in per_layer] == pytest.approx([float(t.norm()) for t in ref])
    total = dfn.random_update(ref, seed=0)  # the default: isotropic, like DP's noise
    assert _norm(total) == pytest.approx(_norm(ref))
    # Isotropic: the layers' shares of the squared norm follow their sizes (400 vs 100
    # entries: 0.8), not the reference's (almost all of it in the first).
    big = [torch.randn(400) * 5, torch.randn(100) * 0.1]
    iso = dfn.random_update(big, seed=1)
    assert float(iso[0].norm()) ** 2 / _norm(iso) ** 2 == pytest.approx(0.8, abs=0.05)


# --- the CLI --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def phantom_data(tmp_path_factory):
    from dpseg.data import write_phantom_dataset

    root = tmp_path_factory.mktemp("phantoms")
    write_phantom_dataset(root, cases=2, sites=1, size=32, seed=0, progress=False)
    return root


def _parse(argv):
    parser = argparse.ArgumentParser()
    add_attack_parser(parser.add_subparsers(dest="command"))
    return parser.parse_args(["attack", *argv])


def test_cli_writes_the_run_folder(phantom_data, tmp_path):
    from dpseg.data import MSDDataset

    case = MSDDataset(phantom_data).cases[0].name
    out = tmp_path / "run"
    args = _parse(
        [
            "--data",
            str(phantom_data),
            "--case",
            case,
            "--dims",
            "2",
            "--patch",
            "16",
            "--batch",
            "2",
            "--iterations",
            "2",
            "--restarts",
            "1",
            "--channels",
            "4,8",
            "--defences",
            "none,clip,dp:1.0",
            "--train-steps",
            "1",
            "--out",
            str(out),
        ]
    )
    assert args.func(args) == 0
    report = json.loads((out / "report.json").read_text())
    assert [d["name"] for d in report["defences"]] == ["none", "clip", "dp:1.0"]
    for row in [*report["defences"], report["baseline"]]:
        assert {"name", "noise_multiplier", "ssim", "psnr", "mse"} <= set(row)
    text = (out / "report.md").read_text()
    assert (out / "attack.png").stat().st_size > 0 and "| dp:1.0 |" in text
    # The floor: an image 1% away from the original has an update near, not at, the original's.
    floor = report["matching_floor"]
    assert floor["noise_std"] == 0.01 and 0.0 < floor["grad_distance"] < 0.5
    assert 0.8 < floor["ssim"] < 1.0 and "Matching floor" in text
    # The undefended row carries the path from the original to its reconstruction.
    path = report["defences"][0]["path"]
    assert path["t"][0] == 0.0 and path["t"][-1] == 1.0
    assert path["grad_distance"][0] == pytest.approx(0.0, abs=1e-5)
    assert path["grad_distance"][-1] == pytest.approx(
        report["defences"][0]["grad_distance"], abs=1e-5
    )
    assert "path" not in report["defences"][1] and "Path from the original" in text
    assert report["path_figure"] == "path.png" and (out / "path.png").stat().st_size > 0
    # Every image of the figure is saved, at the original's shape.
    saved = np.load(out / "reconstructions.npz")
    assert sorted(saved.files) == sorted(["original", "none", "clip", "dp:1.0", "random-gradient"])
    assert all(saved[k].shape == (2, 1, 16, 16) for k in saved.files)


@pytest.mark.parametrize(
    "argv, match",
    [
        (["--defences", "none,dp:abc"], "dp:abc"),
        (["--case", "nobody"], "nobody"),
        (["--patch", "64"], "does not fit"),
        (["--patch", "17"], "divisible"),
    ],
)
def test_cli_usage_errors(phantom_data, tmp_path, argv, match):
    from dpseg.data import MSDDataset

    case = MSDDataset(phantom_data).cases[0].name
    base = [
        "--data",
        str(phantom_data),
        "--case",
        case,
        "--patch",
        "16",
        "--channels",
        "4,8",
        "--iterations",
        "1",
        "--restarts",
        "1",
        "--out",
        str(tmp_path / "r"),
    ]
    args = _parse(base + argv)
    with pytest.raises(UsageError, match=match):
        args.func(args)


def test_mask_reference_paints_the_mask_with_the_originals_means():
    from dpseg.attack.experiment import mask_reference
    from dpseg.attack.metrics import ssim

    g = torch.Generator().manual_seed(3)
    x = torch.rand(2, 1, 16, 16, generator=g)
    y = (torch.rand(2, 16, 16, generator=g) > 0.6).long()
    expected = []
    for b in range(2):
        m = y[b] > 0
        painted = torch.where(m, x[b, 0][m].mean(), x[b, 0][~m].mean())
        expected.append(ssim(painted, x[b, 0], 1.0))
    assert mask_reference(x, y)["ssim"] == pytest.approx(sum(expected) / 2, abs=1e-9)
    # An image that is exactly two-valued on its mask is its own reference.
    flat = (0.2 + 0.5 * y.float()).unsqueeze(1)
    assert mask_reference(flat, y)["ssim"] == pytest.approx(1.0, abs=1e-9)


def test_path_profile_from_the_original_to_a_reconstruction():
    from dpseg.attack.experiment import path_profile
    from dpseg.attack.inversion import ThreatModel, gradient_distance, simulate_update
    from dpseg.attack.metrics import ssim

    model, loss, x, y = _setup(b=1)
    target = dfn.shared_update(model, loss, x, y, dfn.parse_defence("none"))
    g = torch.Generator().manual_seed(5)
    rec = torch.rand(x.shape, generator=g)
    prof = path_profile(model, loss, x, y, rec, target, ThreatModel())
    probs = torch.nn.functional.one_hot(y, 2).movedim(-1, 1).float()
    for k in (3, -1):  # any point, recomputed directly
        xt = x + prof["t"][k] * (rec - x)
        direct = gradient_distance(
            [u.detach() for u in simulate_update(model, xt, probs, loss)], target
        )
        assert prof["grad_distance"][k] == pytest.approx(float(direct), abs=1e-6)
        assert prof["ssim"][k] == pytest.approx(ssim(xt[0, 0], x[0, 0], 1.0), abs=1e-9)
    assert prof["grad_distance"][0] == pytest.approx(0.0, abs=1e-5) and prof["ssim"][0] == 1.0
    # The basin: every point up to basin_t matches at least as well as the reconstruction,
    # and the next one (if any) does not.
    end, i = prof["grad_distance"][-1], prof["t"].index(prof["basin_t"])
    assert all(d <= end + 1e-6 for d in prof["grad_distance"][: i + 1])
    assert i == len(prof["t"]) - 1 or prof["grad_distance"][i + 1] > end
    assert prof["basin_ssim"] == min(prof["ssim"][: i + 1])
    assert prof["barrier"] == pytest.approx(max(prof["grad_distance"]) - end)
    # The original itself: no barrier, and the basin is the whole (zero-length) path.
    same = path_profile(model, loss, x, y, x.clone(), target, ThreatModel())
    assert same["barrier"] == pytest.approx(0.0, abs=1e-6) and same["basin_t"] == 1.0
    # A target the reconstruction matches exactly and the original does not: no valley of
    # the original to speak of.
    own = dfn.shared_update(model, loss, rec, y, dfn.parse_defence("none"))
    flipped = path_profile(model, loss, x, y, rec, own, ThreatModel())
    assert flipped["basin_t"] is None and flipped["basin_ssim"] is None
    assert flipped["grad_distance"][0] > flipped["grad_distance"][-1] + 1e-3
