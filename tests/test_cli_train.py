"""`dpseg phantoms | train | predict` end to end on tiny phantoms (24^3, a 2-level U-Net).

Each `dpseg train` call here runs a few steps of a 4/8-channel U-Net on 16^3 patches, so the
whole file takes well under a minute on two busy cores.
"""

import json

import nibabel as nib
import numpy as np
import pytest
import torch
from scipy import ndimage

from dpseg.cli import main
from dpseg.data import write_phantom_dataset
from dpseg.train.checkpoint import load_checkpoint

TINY = ["--patch", "16", "--batch", "2", "--channels", "4,8", "--quiet", "--epsilon-every", "1"]
REPORT_KEYS = {"dice", "epsilon", "delta", "steps", "seconds", "device", "config", "per_case"}


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory):
    out = tmp_path_factory.mktemp("phantoms")
    write_phantom_dataset(out, cases=6, sites=2, size=24, seed=0, progress=False)
    return out


def _train(data, out, *extra):
    return main(["train", "--data", str(data), "--out", str(out), *TINY, *extra])


def _report(run):
    return json.loads((run / "report.json").read_text())


def test_phantoms_cli(tmp_path, capsys):
    assert (
        main(
            [
                "phantoms",
                "--out",
                str(tmp_path),
                "--cases",
                "3",
                "--sites",
                "2",
                "--size",
                "16",
                "--quiet",
            ]
        )
        == 0
    )
    meta = json.loads((tmp_path / "dataset.json").read_text())
    assert [e["site"] for e in meta["training"]] == ["site0", "site1", "site0"]
    assert all((tmp_path / e["image"]).exists() for e in meta["training"])
    assert main(["phantoms", "--out", str(tmp_path / "x"), "--cases", "1", "--sites", "2"]) == 2
    err = capsys.readouterr().err
    assert "sites" in err and "Traceback" not in err


def test_train_no_dp_writes_every_output(phantoms, tmp_path):
    run = tmp_path / "run"
    assert _train(phantoms, run, "--no-dp", "--steps", "3", "--eval-every", "2") == 0
    for name in (
        "checkpoint.pt",
        "report.json",
        "report.md",
        "loss.png",
        "dice.png",
        "epsilon.png",
    ):
        assert (run / name).stat().st_size > 0, name
    rep = _report(run)
    assert REPORT_KEYS <= set(rep)
    assert rep["steps"] == 3 and rep["epsilon"] is None and rep["dp"] is False
    assert 0.0 <= rep["dice"] <= 1.0 and rep["seconds"] > 0
    assert len(rep["per_case"]) == rep["val_cases"] >= 1
    assert len(rep["history"]["loss"]) == 3 and [s for s, _ in rep["history"]["dice"]] == [2, 3]
    assert "hd95_mm" in rep["per_case"][0]
    kept = [r["largest_component"]["dice"] for r in rep["per_case"]]
    assert rep["dice_largest_component"] == pytest.approx(sum(kept) / len(kept))
    text = (run / "report.md").read_text()
    assert f"largest component kept | {rep['dice_largest_component']:.3f} |" in text


def test_train_dp_resume_continues_the_ledger_and_the_run(phantoms, tmp_path):
    whole, split = tmp_path / "whole", tmp_path / "split"
    common = [
        "--noise-multiplier",
        "1.0",
        "--max-grad-norm",
        "1.0",
        "--seed",
        "3",
        "--val-fraction",
        "0",
    ]
    # the two runs share their secret only because it is given; by default each draws its own
    common += ["--secret-seed", "11"]
    assert _train(phantoms, whole, "--steps", "4", *common) == 0
    assert _train(phantoms, split, "--steps", "2", *common) == 0
    eps_2 = _report(split)["epsilon"]
    assert eps_2 > 0
    assert main(["train", "--out", str(split), "--resume", "--steps", "4", "--quiet"]) == 0
    rep, ref = _report(split), _report(whole)
    assert rep["steps"] == 4 and rep["resumed_from_step"] == 2
    assert rep["epsilon"] > eps_2  # continues from the saved ledger, never resets
    assert rep["epsilon"] == pytest.approx(ref["epsilon"], rel=1e-9)
    assert [s for s, _ in rep["history"]["epsilon"]] == [1, 2, 3, 4]
    nan = float("nan")  # an empty Poisson batch has no loss (null in JSON)
    losses = [[nan if v is None else v for v in r["history"]["loss"]] for r in (rep, ref)]
    np.testing.assert_allclose(*losses, rtol=1e-6)
    # Same seeds: the interrupted run ends on the uninterrupted run's weights.
    a = torch.load(whole / "checkpoint.pt", weights_only=True)
    b = torch.load(split / "checkpoint.pt", weights_only=True)
    assert a["step"] == b["step"] == 4
    assert a["optimizer"]["dpseg"] == b["optimizer"]["dpseg"]
    for k, v in a["model"].items():
        torch.testing.assert_close(b["model"][k], v, rtol=1e-5, atol=1e-6, msg=k)


def test_resume_refuses_changed_privacy_and_fresh_run_keeps_checkpoint(phantoms, tmp_path, capsys):
    run = tmp_path / "run"
    assert _train(phantoms, run, "--steps", "1", "--val-fraction", "0") == 0
    before = (run / "checkpoint.pt").read_bytes()
    assert (
        main(["train", "--out", str(run), "--resume", "--noise-multiplier", "0.5", "--quiet"]) == 2
    )
    err = capsys.readouterr().err
    assert "--noise-multiplier" in err and "Traceback" not in err
    assert _train(phantoms, run, "--steps", "2") == 2  # no --resume: refused, nothing lost
    assert "checkpoint.pt" in capsys.readouterr().err
    assert (run / "checkpoint.pt").read_bytes() == before


def test_target_epsilon_and_config_file(phantoms, tmp_path):
    cfg = tmp_path / "run.toml"
    cfg.write_text(
        "steps = 3\ntarget_epsilon = 4.0\ndelta = 1e-5\nchannels = [4, 8]\nval_fraction = 0\n"
    )
    run = tmp_path / "run"
    assert (
        main(
            [
                "train",
                "--config",
                str(cfg),
                "--data",
                str(phantoms),
                "--out",
                str(run),
                "--patch",
                "16",
                "--quiet",
            ]
        )
        == 0
    )
    rep = _report(run)
    assert rep["steps"] == 3 and rep["dice"] is None
    assert 3.9 < rep["epsilon"] <= 4.0 * 1.011
    assert rep["config"]["channels"] == [4, 8]


@pytest.mark.parametrize("upsample, mode", [("interp", "hooks"), ("transpose", "functorch")])
def test_opacus_engine_baseline(phantoms, tmp_path, upsample, mode):
    # --batch 6 over the 6 cases: sample rate 1, so no empty Poisson batch, which Opacus's
    # functorch mode cannot run (vmap over zero samples fails in its conv rule).
    run = tmp_path / "run"
    assert (
        _train(
            phantoms,
            run,
            "--engine",
            "opacus",
            "--batch",
            "6",
            "--upsample",
            upsample,
            "--steps",
            "2",
            "--val-fraction",
            "0",
        )
        == 0
    )
    rep = _report(run)
    assert rep["engine"] == "opacus" and rep["grad_sample_mode"] == mode and rep["epsilon"] > 0
    assert mode in (run / "report.md").read_text()


def test_two_dimensional_model(phantoms, tmp_path):
    run = tmp_path / "run"
    assert _train(phantoms, run, "--spatial-dims", "2", "--steps", "2") == 0
    rep = _report(run)
    assert rep["config"]["spatial_dims"] == 2 and 0.0 <= rep["dice"] <= 1.0


@pytest.fixture(scope="module")
def trained_run(phantoms, tmp_path_factory):
    """A tiny run that resamples to 8 mm, so predict must undo resampling and orientation."""
    run = tmp_path_factory.mktemp("predict") / "run"
    assert _train(phantoms, run, "--steps", "2", "--spacing", "8,8,8", "--val-fraction", "0") == 0
    return run


def _predict_on_own_grid(run, image, out):
    """Runs `dpseg predict` and checks the mask lies on the image's own shape and affine."""
    argv = ["predict", "--checkpoint", str(run / "checkpoint.pt"), "--image", str(image)]
    assert main([*argv, "--out", str(out)]) == 0
    src, mask = nib.load(str(image)), nib.load(str(out))
    assert mask.shape == src.shape
    np.testing.assert_array_equal(mask.affine, src.affine)
    return src, mask


@pytest.mark.real_data
@pytest.mark.parametrize("case", ["liver_0", "liver_1"])  # RAS int32 3 mm; LAS int16 0.98 mm
def test_predict_real_ct_keeps_shape_and_affine(trained_run, shared_data, tmp_path, case):
    image = shared_data / "liver_ct_mini" / "imagesTr" / f"{case}.nii.gz"
    src, mask = _predict_on_own_grid(trained_run, image, tmp_path / "mask.nii.gz")
    assert nib.aff2axcodes(mask.affine) == nib.aff2axcodes(src.affine)
    data = np.asanyarray(mask.dataobj)
    assert np.issubdtype(data.dtype, np.integer) and set(np.unique(data)) <= {0, 1}


def test_predict_phantom_round_trip(trained_run, phantoms, tmp_path):
    image = phantoms / "imagesTr" / "phantom_0000.nii.gz"
    _, mask = _predict_on_own_grid(trained_run, image, tmp_path / "sub" / "mask.nii.gz")
    # --largest-component: the same mask with every island of a class removed (compared
    # by component sizes: which of two equal largest pieces is kept depends on the order).
    argv = ["predict", "--checkpoint", str(trained_run / "checkpoint.pt"), "--image", str(image)]
    out = tmp_path / "kept.nii.gz"
    assert main([*argv, "--out", str(out), "--largest-component"]) == 0
    raw, kept = np.asanyarray(mask.dataobj), np.asanyarray(nib.load(str(out)).dataobj)
    assert np.array_equal(kept > 0, (raw > 0) & (kept > 0))  # only removes
    full = np.ones((3, 3, 3), dtype=bool)
    pieces, n = ndimage.label(raw == 1, structure=full)
    _, m = ndimage.label(kept == 1, structure=full)
    sizes = np.bincount(pieces.ravel())[1:]
    assert m == min(n, 1) and (n == 0 or (kept == 1).sum() == sizes.max())


def test_sampling_and_noise_are_keyed_by_a_secret_kept_out_of_the_checkpoint(phantoms, tmp_path):
    """The same --seed must not replay the Poisson draws or the noise: each run keys them
    with a secret from OS entropy, kept owner-only in RUN/secret.key, in neither the
    checkpoint nor the report; a given --secret-seed replays them exactly."""
    from dpseg.privacy.secret import SECRET_FILE

    args = ["--noise-multiplier", "1.0", "--seed", "3", "--val-fraction", "0", "--steps", "2"]
    runs = [tmp_path / name for name in ("a", "b", "c", "d")]
    secret = ["--secret-seed", "5"]
    for run, extra in zip(runs, ([], [], secret, secret), strict=True):
        assert _train(phantoms, run, *args, *extra) == 0
    weights = [torch.load(r / "checkpoint.pt", weights_only=True)["model"] for r in runs]
    differs = any(not torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    assert differs  # same --seed, own secrets: other batches and noise
    for k in weights[2]:
        assert torch.equal(weights[2][k], weights[3][k])  # a given secret replays them
    secret_a = (runs[0] / SECRET_FILE).read_text().strip()
    assert secret_a != (runs[1] / SECRET_FILE).read_text().strip()
    assert (runs[0] / SECRET_FILE).stat().st_mode & 0o077 == 0  # owner-only
    ckpt = torch.load(runs[0] / "checkpoint.pt", weights_only=True)
    assert "noise_seed" not in ckpt["optimizer"]["dpseg"]  # the noise stays replayable only
    assert ckpt["config"]["secret_seed"] is None  # from the secret, which is not in here
    assert secret_a not in (runs[0] / "report.json").read_text()
    # A fresh run in a folder an earlier run left its secret in (its checkpoint deleted)
    # draws a new one: with the old it would replay that run's batches and noise.
    (runs[0] / "checkpoint.pt").unlink()
    assert _train(phantoms, runs[0], *args) == 0
    assert (runs[0] / SECRET_FILE).read_text().strip() != secret_a


def test_the_privacy_unit_is_named_in_the_ledger_report_and_evaluation(phantoms, tmp_path, capsys):
    # A subject may have several MSD cases (the hippocampus: one crop per hemisphere): the
    # run then says its unit is the case, in every place the epsilon is stated.
    from dpseg.train.scoring import evaluate_checkpoint

    run = tmp_path / "run"
    assert _train(phantoms, run, "--steps", "1", "--privacy-unit", "case", "--sample-rate",
                  "0.5") == 0  # fmt: skip
    report = _report(run)
    assert report["unit"] == "case"
    assert "| epsilon is per | case" in (run / "report.md").read_text()
    ckpt = load_checkpoint(run / "checkpoint.pt")
    assert ckpt["privacy"]["ledger"]["unit"] == "case"
    with pytest.warns(UserWarning, match="not a held-out score"):
        f = evaluate_checkpoint(run / "checkpoint.pt", phantoms, None, progress=False)
    assert f["unit"] == "case" and "inferred" not in f
    # A name is refused where it would misstate the unit, and a resume may not rename it.
    assert _train(phantoms, tmp_path / "bad", "--privacy-unit", "item") == 2
    assert 'not "item"' in capsys.readouterr().err
    assert main(["train", "--out", str(run), "--resume", "--steps", "2", "--quiet",
                 "--privacy-unit", "patient"]) == 2  # fmt: skip
    assert "privacy-unit" in capsys.readouterr().err
