"""Committed splits, `dpseg train --split`, `dpseg evaluate` (Dice held against numpy on the
masks `dpseg predict` writes, epsilon against the training report, the paired bootstrap) and
the overlay panels, on a tiny synthetic MRI-like MSD folder (labels 0/1/2, as Task04)."""

import json

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from dpseg.cli import main
from dpseg.data import MSDDataset
from dpseg.train.config import resolve_normalize
from dpseg.train.overlay import best_slice, pick_cases, take_slice
from dpseg.train.scoring import paired_bootstrap, read_scores
from dpseg.train.splits import make_split, parse_split_spec, read_case_list

TINY = ["--patch", "16", "--batch", "2", "--channels", "4,8", "--quiet", "--threads", "1"]
NAMES = [f"hippo_{i:03d}" for i in range(8)]


def _write_msd(root, names=NAMES, seed=0):
    """Cases of 18-22 voxels a side: a dark background, an 'anterior' box (1) in front of a
    'posterior' box (2), intensities on an MR-like arbitrary scale (x1000 for some cases)."""
    rng = np.random.default_rng(seed)
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    entries = []
    for i, name in enumerate(names):
        shape = tuple(int(s) for s in rng.integers(18, 23, size=3))
        label = np.zeros(shape, np.uint8)
        x0, z0 = rng.integers(3, 6, size=2)
        label[x0 : x0 + 8, 4:10, z0 : z0 + 8] = 1
        label[x0 : x0 + 8, 10:16, z0 : z0 + 8] = 2
        image = rng.normal(100, 10, shape) + 80 * (label > 0) + 40 * (label == 2)
        image = (image * (1000 if i % 3 == 0 else 1)).astype(np.float32)
        nib.save(nib.Nifti1Image(image, np.eye(4)), root / "imagesTr" / f"{name}.nii.gz")
        nib.save(nib.Nifti1Image(label, np.eye(4)), root / "labelsTr" / f"{name}.nii.gz")
        entries.append({"image": f"./imagesTr/{name}.nii.gz", "label": f"./labelsTr/{name}.nii.gz"})
    meta = {
        "name": "TinyHippo",
        "modality": {"0": "MRI"},
        "labels": {"0": "background", "1": "Anterior", "2": "Posterior"},
        "training": entries,
    }
    (root / "dataset.json").write_text(json.dumps(meta))
    return root


@pytest.fixture(scope="module")
def msd(tmp_path_factory):
    return _write_msd(tmp_path_factory.mktemp("tinyhippo"))


@pytest.fixture(scope="module")
def split_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("split") / "split.json"
    lists = make_split(NAMES, test=3, seed=5, subset_sizes=(2, 4), subset_seeds=(0, 1))
    path.write_text(json.dumps({"lists": lists}))
    return path


@pytest.fixture(scope="module")
def runs(msd, split_file, tmp_path_factory):
    """A non-private and a DP run on the split's training list (2 steps each)."""
    base = tmp_path_factory.mktemp("runs")
    args = ["train", "--data", str(msd), "--split", str(split_file), *TINY, "--steps", "2"]
    assert main([*args, "--no-dp", "--out", str(base / "nodp")]) == 0
    assert main([*args, "--noise-multiplier", "1.0", "--out", str(base / "dp")]) == 0
    return base


# --- splits --------------------------------------------------------------------------------
def test_make_split_is_disjoint_nested_and_reproducible():
    names = [f"case_{i:03d}" for i in range(200)]
    a = make_split(names, 40, 24, (40, 80), (0, 1))
    assert len(a["train"]) == 160 and len(a["test"]) == 40
    assert not set(a["train"]) & set(a["test"])
    assert set(a["train"]) | set(a["test"]) == set(names)
    for s in (0, 1):
        small, mid = set(a[f"train40_s{s}"]), set(a[f"train80_s{s}"])
        assert len(small) == 40 and len(mid) == 80 and small < mid < set(a["train"])
    assert a["train40_s0"] != a["train40_s1"]
    assert make_split(list(reversed(names)), 40, 24, (40, 80), (0, 1)) == a  # order-free
    assert make_split(names, 40, 25, (40, 80), (0, 1))["test"] != a["test"]  # seed matters


def test_committed_split_matches_its_script():
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "docs/results/hippocampus/split.json"
    split = json.loads(path.read_text())
    lists = split["lists"]
    names = lists["train"] + lists["test"]
    assert len(lists["train"]) == 160 and len(lists["test"]) == 40 and len(set(names)) == 200
    assert make_split(names, 40, split["seed"], (40, 80), (0, 1)) == lists


def test_read_case_list_errors_say_what_to_change(tmp_path, split_file):
    from dpseg.data import DataError

    assert parse_split_spec("a/b.json:test", "train") == (tmp_path.__class__("a/b.json"), "test")
    assert parse_split_spec("a/b.json", "train")[1] == "train"
    assert (
        read_case_list(f"{split_file}:train2_s0")
        == json.loads(split_file.read_text())["lists"]["train2_s0"]
    )
    with pytest.raises(DataError, match="has no list 'nope'"):
        read_case_list(f"{split_file}:nope")
    with pytest.raises(DataError, match="not found"):
        read_case_list(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text('{"train": ["a"]}')
    with pytest.raises(DataError, match='"lists"'):
        read_case_list(bad)


def test_train_split_never_loads_other_cases(msd, split_file, tmp_path, monkeypatch):
    loaded = []
    real = MSDDataset.load

    def spy(self, i):
        loaded.append(self.cases[i].name)
        return real(self, i)

    monkeypatch.setattr(MSDDataset, "load", spy)
    out = tmp_path / "run"
    spec = f"{split_file}:train4_s1"
    args = ["train", "--data", str(msd), "--split", spec, *TINY, "--steps", "1", "--no-dp"]
    assert main([*args, "--out", str(out)]) == 0
    listed = set(read_case_list(spec))
    assert set(loaded) <= listed
    report = json.loads((out / "report.json").read_text())
    assert report["train_cases"] + report["val_cases"] == 4
    assert {r["case"] for r in report["per_case"]} < listed


def test_train_split_errors(msd, tmp_path, capsys):
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"lists": {"train": ["hippo_000", "liver_9"]}}))
    args = ["train", "--data", str(msd), *TINY, "--steps", "1", "--no-dp"]
    assert main([*args, "--split", str(other), "--out", str(tmp_path / "r")]) == 2
    err = capsys.readouterr().err
    assert "liver_9" in err and "not in the dataset" in err and "Traceback" not in err


def test_mr_is_normalised_per_volume(runs):
    import torch

    ckpt = torch.load(runs / "nodp" / "checkpoint.pt", weights_only=True)
    assert ckpt["preprocessing"]["normalize"] == "percentile"
    assert resolve_normalize("auto", {"0": "CT"}) == "window"
    assert resolve_normalize("auto", {}) == "window"
    assert resolve_normalize("auto", {"0": "MRI"}) == "percentile"
    assert resolve_normalize("zscore", {"0": "CT"}) == "zscore"


# --- evaluate ------------------------------------------------------------------------------
def _numpy_dice(pred, truth, c):
    p, t = pred == c, truth == c
    denom = p.sum() + t.sum()
    return 1.0 if denom == 0 else 2.0 * (p & t).sum() / denom


def test_evaluate_dice_matches_numpy_on_predicted_masks(msd, split_file, runs, tmp_path, capsys):
    ckpt = runs / "nodp" / "checkpoint.pt"
    out = tmp_path / "f.json"
    code = main(
        [
            "evaluate",
            "--checkpoint",
            str(ckpt),
            "--data",
            str(msd),
            "--out",
            str(out),
            "--cases",
            f"{split_file}:test",
            "--quiet",
            "--threads",
            "1",
        ]
    )
    assert code == 0
    printed = capsys.readouterr().out
    assert "mean over labels" in printed and "epsilon inf" in printed
    f = json.loads(out.read_text())
    test = read_case_list(f"{split_file}:test")
    assert f["cases"] == len(test) == 3 and set(f["per_case"]) == set(test)
    assert f["epsilon"] is None and f["delta"] is None and f["unit"] is None
    assert f["seen_in_training"] == []
    for lc in (False, True):
        per_label = {"1": [], "2": []}
        for case in test:
            mask = tmp_path / f"{case}{lc}.nii.gz"
            extra = ["--largest-component"] if lc else []
            image = msd / "imagesTr" / f"{case}.nii.gz"
            args = ["predict", "--checkpoint", str(ckpt), "--image", str(image)]
            assert main([*args, "--out", str(mask), *extra]) == 0
            pred = np.asarray(nib.load(mask).dataobj)
            truth = np.asarray(nib.load(msd / "labelsTr" / f"{case}.nii.gz").dataobj)
            row = f["per_case"][case]["largest_component"] if lc else f["per_case"][case]
            for c in (1, 2):
                d = _numpy_dice(pred, truth, c)
                assert row["dice_per_label"][str(c)] == pytest.approx(d, abs=1e-12)
                per_label[str(c)].append(d)
            assert row["mean_dice"] == pytest.approx(
                np.mean([row["dice_per_label"][k] for k in "12"])
            )
        summary = f["largest_component"] if lc else f
        for c in "12":
            assert summary["dice_per_label"][c] == pytest.approx(np.mean(per_label[c]))
        assert summary["mean_dice"] == pytest.approx(
            np.mean([np.mean([per_label["1"][i], per_label["2"][i]]) for i in range(3)])
        )
    md = out.with_suffix(".md").read_text()
    assert "![overlays](f_overlays.png)" in md
    assert (tmp_path / "f_overlays.png").stat().st_size > 5000


def test_evaluate_reads_the_privacy_ledger(msd, runs, tmp_path):
    out = tmp_path / "dp.json"
    ckpt = runs / "dp" / "checkpoint.pt"
    args = ["evaluate", "--checkpoint", str(ckpt), "--data", str(msd), "--out", str(out)]
    assert (
        main(
            [
                *args,
                "--quiet",
                "--overlay-cases",
                "2",
                "--also",
                str(runs / "nodp" / "checkpoint.pt"),
            ]
        )
        == 0
    )
    f = json.loads(out.read_text())
    report = json.loads((runs / "dp" / "report.json").read_text())
    assert f["epsilon"] == pytest.approx(report["epsilon"], rel=1e-6) and f["epsilon"] > 0
    assert f["delta"] == report["delta"] == 1e-5
    # the ledger's own unit and adjacency where it records them (the engine with privacy
    # units), else what an older engine meant: one row per case, add/remove
    assert f["unit"] == report.get("unit", "case")
    assert f["adjacency"] == report.get("adjacency", "add/remove")
    assert f["dp_steps"] == 2 and f["noise_multiplier"] == 1.0
    # every case was scored; the training and validation ones are named
    assert f["cases"] == len(NAMES)
    split = report["config"]["split"]
    trained = set(read_case_list(split))
    assert set(f["seen_in_training"]) == trained


def test_ledger_unit_and_adjacency_are_read_when_present():
    from dpseg.train.scoring import ledger_privacy

    ledger = {
        "accountant": "rdp",
        "history": [(1.0, 0.25, 10)],
        "unit": "patient",
        "adjacency": "add/remove one patient",
        "sampling": "poisson",
    }
    ckpt = {"config": {"dp": True, "delta": 1e-5}, "privacy": {"ledger": ledger}}
    p = ledger_privacy(ckpt)
    assert p["unit"] == "patient" and p["adjacency"] == "add/remove one patient"
    assert "inferred" not in p and p["dp_steps"] == 10 and 0 < p["epsilon"] < 100
    assert ledger_privacy({"config": {"dp": False}, "privacy": {"ledger": None}})["epsilon"] is None


def test_evaluate_errors_are_clear(msd, runs, tmp_path, capsys):
    ckpt = str(runs / "nodp" / "checkpoint.pt")
    cases = [
        (["--checkpoint", ckpt, "--data", str(msd)], "--out required"),
        (["--checkpoint", ckpt, "--data", str(msd), "--out", str(tmp_path / "f.txt")], ".json"),
        (
            [
                "--checkpoint",
                str(tmp_path / "no.pt"),
                "--data",
                str(msd),
                "--out",
                str(tmp_path / "f.json"),
            ],
            "checkpoint not found",
        ),
        (
            ["--checkpoint", ckpt, "--data", str(tmp_path), "--out", str(tmp_path / "f.json")],
            "dataset.json",
        ),
        (["--compare", ckpt, ckpt, "--checkpoint", ckpt], "drop --checkpoint"),
    ]
    for args, text in cases:
        assert main(["evaluate", *args, "--quiet"]) == 2, args
        err = capsys.readouterr().err
        assert text in err and "Traceback" not in err, (args, err)
    # a model with another number of classes
    two = _write_msd(tmp_path / "two", names=["a", "b"])
    meta = json.loads((two / "dataset.json").read_text())
    meta["labels"] = {"0": "background", "1": "a", "2": "b", "3": "c"}
    (two / "dataset.json").write_text(json.dumps(meta))
    args = ["--checkpoint", ckpt, "--data", str(two), "--out", str(tmp_path / "g.json")]
    assert main(["evaluate", *args, "--quiet"]) == 2
    assert "predicts 3" in capsys.readouterr().err


# --- the paired bootstrap -----------------------------------------------------------------
def _scores(values: dict) -> dict:
    return {
        "per_case": {
            c: {
                "mean_dice": v,
                "dice_per_label": {"1": v, "2": v},
                "largest_component": {"mean_dice": v, "dice_per_label": {"1": v, "2": v}},
            }
            for c, v in values.items()
        }
    }


def test_paired_bootstrap_interval():
    rng = np.random.default_rng(0)
    names = [f"c{i}" for i in range(400)]
    base = rng.uniform(0.5, 0.9, len(names))
    diff = rng.normal(0.05, 0.1, len(names))
    a = _scores(dict(zip(names, base + diff, strict=True)))
    b = _scores(dict(zip(names, base, strict=True)))
    r = paired_bootstrap(a, b, n_boot=4000)
    assert r["diff"] == pytest.approx(diff.mean())
    half = 1.96 * diff.std(ddof=1) / np.sqrt(len(diff))  # the normal interval it should match
    assert r["ci"][0] == pytest.approx(diff.mean() - half, abs=0.15 * half)
    assert r["ci"][1] == pytest.approx(diff.mean() + half, abs=0.15 * half)
    assert r["a_better"] + r["b_better"] == len(names)
    assert paired_bootstrap(a, b, n_boot=4000) == r  # seeded
    same = paired_bootstrap(b, b, n_boot=500)
    assert same["diff"] == 0 and same["ci"] == [0.0, 0.0]
    shifted = _scores({n: v + 0.1 for n, v in zip(names, base, strict=True)})
    assert paired_bootstrap(shifted, b, "2", True)["ci"] == pytest.approx([0.1, 0.1])
    with pytest.raises(ValueError, match="different cases"):
        paired_bootstrap(a, _scores({"c0": 0.5}))


def test_compare_cli(tmp_path, capsys):
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text(json.dumps(_scores({"x": 0.9, "y": 0.8, "z": 0.7})))
    b.write_text(json.dumps(_scores({"x": 0.8, "y": 0.8, "z": 0.6})))
    out = tmp_path / "ab.json"
    assert main(["evaluate", "--compare", str(a), str(b), "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "mean Dice" in text and "+0.067" in text
    rows = json.loads(out.read_text())["rows"]
    assert len(rows) == 6 and rows[0]["diff"] == pytest.approx(0.2 / 3)
    assert read_scores(a)["per_case"]["x"]["mean_dice"] == 0.9
    b.write_text("{}")
    assert main(["evaluate", "--compare", str(a), str(b)]) == 2
    assert "per_case" in capsys.readouterr().err


# --- overlays ------------------------------------------------------------------------------
def test_best_slice_and_case_choice():
    truth = np.zeros((10, 12, 14), np.uint8)
    truth[2:8, 5, 3:11] = 1  # a sheet in the plane y = 5: 48 voxels
    truth[4, 1:4, 1:3] = 2
    assert best_slice(truth) == (1, 5)
    assert take_slice(truth, 1, 5).shape == (14, 10)
    assert best_slice(np.zeros((4, 4, 6))) == (2, 3)
    scores = {f"c{i}": s for i, s in enumerate([0.5, 0.1, 0.9, 0.7, 0.3, 0.8])}
    assert pick_cases(scores, 3) == ["c1", "c0", "c2"]  # worst, middle (index 2 of 5), best
    assert pick_cases({"a": 1.0}, 4) == ["a"]


def test_train_report_shows_overlays(runs):
    for run in ("nodp", "dp"):
        report = json.loads((runs / run / "report.json").read_text())
        assert report["overlays"] == "overlays.png"
        assert (runs / run / "overlays.png").stat().st_size > 5000
        assert "![overlays](overlays.png)" in (runs / run / "report.md").read_text()


def test_largest_component_oracle_is_independent():
    """The numpy oracle above relies on `dpseg predict --largest-component`; hold that against
    scipy's labelling directly on a map with a stray island."""
    from dpseg.train.postprocess import keep_largest_component

    labels = np.zeros((12, 12, 12), np.uint8)
    labels[2:6, 2:6, 2:6] = 1
    labels[9, 9, 9] = 1
    comp, n = ndimage.label(labels == 1, structure=np.ones((3, 3, 3)))
    assert n == 2
    kept = keep_largest_component(labels, 3)
    assert kept.sum() == 64 and kept[9, 9, 9] == 0


def test_federate_split_and_overlays(msd, split_file, tmp_path, monkeypatch):
    loaded = []
    real = MSDDataset.load

    def spy(self, i):
        loaded.append(self.cases[i].name)
        return real(self, i)

    monkeypatch.setattr(MSDDataset, "load", spy)
    out = tmp_path / "fed"
    flags = [
        "--data", str(msd), "--split", str(split_file), "--partition", "iid", "--sites", "2",
        "--test-fraction", "0.4", "--patch", "16", "--channels", "4,8", "--local-steps", "1",
        "--batch", "2", "--rounds", "1", "--accountant", "rdp", "--compare", "dpseg,none",
        "--privacy-unit", "case",
    ]  # fmt: skip
    assert main(["federate", *flags, "--out", str(out)]) == 0
    train = set(read_case_list(split_file))
    assert set(loaded) <= train  # the test list is never read, not even for the panels
    report = json.loads((out / "report.json").read_text())
    used = {c for s in report["sites"].values() for part in s["cases"].values() for c in part}
    assert used == train
    assert (out / "overlays.png").stat().st_size > 5000
    assert "![overlays](overlays.png)" in (out / "report.md").read_text()
    assert main(["federate", "--phantoms", "4", "--sites", "2", "--split", str(split_file),
                 "--out", str(tmp_path / "x")]) == 2  # fmt: skip
    # the global models score with dpseg evaluate as the run scored its held-out cases
    from dpseg.federated.report import final_cases
    from dpseg.train.scoring import evaluate_checkpoint

    held_out = [c for s in report["sites"].values() for c in s["cases"]["test"]]
    for engine in ("dpseg", "none"):
        f = evaluate_checkpoint(out / f"checkpoint_{engine}.pt", msd, held_out, progress=False)
        assert f["checkpoint_kind"] == "federated" and f["trained_rounds"] == 1
        for case, (dice, dice_lc) in final_cases(report, engine).items():
            assert f["per_case"][case]["mean_dice"] == pytest.approx(dice, abs=1e-9)
            assert f["per_case"][case]["largest_component"]["mean_dice"] == pytest.approx(
                dice_lc, abs=1e-9
            )
        assert set(f["seen_in_training"]) == set(held_out)  # validation cases: not a test
        if engine == "none":
            assert f["epsilon"] is None
        else:
            assert f["epsilon"] == pytest.approx(report["max_epsilon"]["dpseg"], rel=1e-6)
            assert set(f["epsilon_per_site"]) == set(report["sites"])
            assert f["unit"] == "case" and "unit" not in f.get("inferred", [])  # recorded
    test = read_case_list(f"{split_file}:test")
    f = evaluate_checkpoint(out / "checkpoint_dpseg.pt", msd, test, progress=False)
    assert f["cases"] == 3 and f["seen_in_training"] == []
    # without the split file the training cases are unknown, and scoring says so
    moved = split_file.rename(split_file.with_suffix(".moved"))
    try:
        with pytest.warns(UserWarning, match="which cases this model trained on is unknown"):
            f = evaluate_checkpoint(out / "checkpoint_dpseg.pt", msd, test, progress=False)
    finally:
        moved.rename(split_file)  # the fixture is the module's
    assert f["cases"] == 3 and f["seen_in_training"] == []
