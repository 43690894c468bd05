"""Bad input to `dpseg train` / `dpseg predict`: one paragraph naming the file, exit code 2,
no traceback, and nothing already in the run folder lost (issue 4, "Bad input")."""

import gzip
import json

import nibabel as nib
import numpy as np
import pytest

from dpseg.cli import main

SIZE = 16


def _save(array, path, affine=None):
    nib.save(nib.Nifti1Image(array, np.eye(4) * 2.0 if affine is None else affine), str(path))


def _dataset(root, cases=3, labels=None):
    """A tiny valid MSD folder: cases of 16^3 with a cube of liver."""
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    entries = []
    for i in range(cases):
        image = np.random.default_rng(i).normal(0, 20, (SIZE,) * 3).astype(np.int16)
        label = np.zeros((SIZE,) * 3, np.uint8)
        label[4:10, 4:10, 4:10] = 1
        _save(image, root / "imagesTr" / f"c{i}.nii.gz")
        _save(label, root / "labelsTr" / f"c{i}.nii.gz")
        entries.append({"image": f"./imagesTr/c{i}.nii.gz", "label": f"./labelsTr/c{i}.nii.gz"})
    meta = {"labels": labels or {"0": "background", "1": "liver"}, "training": entries}
    (root / "dataset.json").write_text(json.dumps(meta))
    return root


def _missing(root):
    meta = json.loads((root / "dataset.json").read_text())
    meta["training"][1]["image"] = "./imagesTr/gone.nii.gz"
    (root / "dataset.json").write_text(json.dumps(meta))
    return "gone.nii.gz"


def _truncated(root):
    path = root / "imagesTr" / "c1.nii.gz"
    path.write_bytes(path.read_bytes()[:300])
    return "c1.nii.gz"


def _corrupt(root):
    (root / "imagesTr" / "c2.nii.gz").write_bytes(gzip.compress(b"not a nifti header" * 30))
    return "c2.nii.gz"


def _shape_mismatch(root):
    _save(np.zeros((SIZE, SIZE, SIZE - 2), np.uint8), root / "labelsTr" / "c1.nii.gz")
    return "c1.nii.gz"


def _affine_mismatch(root):
    label = np.zeros((SIZE,) * 3, np.uint8)
    _save(label, root / "labelsTr" / "c0.nii.gz", affine=np.diag([2.0, 2.0, 3.0, 1.0]))
    return "c0.nii.gz"


def _four_d(root):
    _save(np.zeros((SIZE, SIZE, SIZE, 2), np.int16), root / "imagesTr" / "c2.nii.gz")
    return "c2.nii.gz"


def _nan(root):
    image = np.zeros((SIZE,) * 3, np.float32)
    image[3, 3, 3] = np.nan
    _save(image, root / "imagesTr" / "c1.nii.gz")
    return "c1.nii.gz"


def _undeclared_label(root):
    label = np.zeros((SIZE,) * 3, np.uint8)
    label[2:5, 2:5, 2:5] = 3
    _save(label, root / "labelsTr" / "c2.nii.gz")
    return "c2.nii.gz"


def _empty(root):
    meta = json.loads((root / "dataset.json").read_text())
    meta["training"] = []
    (root / "dataset.json").write_text(json.dumps(meta))
    return "dataset.json"


BREAKAGES = {
    "missing file": _missing,
    "truncated gz": _truncated,
    "corrupt nifti": _corrupt,
    "shape mismatch": _shape_mismatch,
    "affine mismatch": _affine_mismatch,
    "4-D without channel": _four_d,
    "NaN voxels": _nan,
    "undeclared label": _undeclared_label,
    "empty dataset": _empty,
}


def _expect_usage_error(capsys, argv, name):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert name in err, err
    assert "Traceback" not in err
    assert err.startswith("dpseg: error:") and err.strip().count("\n") == 0, err  # one paragraph
    return err


@pytest.mark.parametrize("breakage", list(BREAKAGES), ids=list(BREAKAGES))
def test_train_bad_data(tmp_path, capsys, breakage):
    data = _dataset(tmp_path / "data")
    name = BREAKAGES[breakage](data)
    run = tmp_path / "run"
    run.mkdir()
    (run / "notes.txt").write_text("keep me")
    argv = ["train", "--data", str(data), "--out", str(run), "--steps", "1", "--patch", "16"]
    _expect_usage_error(capsys, [*argv, "--channels", "4,8", "--quiet"], name)
    assert (run / "notes.txt").read_text() == "keep me"
    assert not (run / "checkpoint.pt").exists()


def test_train_unwritable_out(tmp_path, capsys):
    data = _dataset(tmp_path / "data")
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    argv = ["train", "--data", str(data), "--out", str(blocker / "run"), "--steps", "1", "--quiet"]
    _expect_usage_error(capsys, argv, "a_file")
    assert blocker.read_text() == "not a folder"


def test_train_four_d_with_channel_is_accepted(tmp_path):
    data = _dataset(tmp_path / "data", cases=2)
    for i in range(2):
        _save(np.zeros((SIZE, SIZE, SIZE, 2), np.int16), data / "imagesTr" / f"c{i}.nii.gz")
    argv = ["train", "--data", str(data), "--out", str(tmp_path / "run"), "--steps", "1"]
    assert main([*argv, "--patch", "16", "--channels", "4,8", "--channel", "1", "--quiet"]) == 0


def test_train_missing_dataset_and_bad_values(tmp_path, capsys):
    _expect_usage_error(
        capsys, ["train", "--data", str(tmp_path / "nope"), "--out", str(tmp_path / "r")], "nope"
    )
    data = _dataset(tmp_path / "data")
    argv = ["train", "--data", str(data), "--out", str(tmp_path / "r"), "--quiet"]
    _expect_usage_error(capsys, [*argv, "--patch", "18", "--channels", "4,8,16"], "patch 18")
    _expect_usage_error(capsys, [*argv, "--resume"], "checkpoint.pt")


def test_predict_bad_input(tmp_path, capsys):
    data = _dataset(tmp_path / "data", cases=2)
    run = tmp_path / "run"
    argv = ["train", "--data", str(data), "--out", str(run), "--steps", "1", "--patch", "16"]
    assert main([*argv, "--channels", "4,8", "--val-fraction", "0", "--quiet"]) == 0
    ckpt, image = run / "checkpoint.pt", data / "imagesTr" / "c0.nii.gz"

    def predict(c, i, o):
        return ["predict", "--checkpoint", str(c), "--image", str(i), "--out", str(o)]

    _expect_usage_error(
        capsys, predict(ckpt, tmp_path / "none.nii.gz", tmp_path / "m.nii.gz"), "none.nii.gz"
    )
    _expect_usage_error(capsys, predict(tmp_path / "no.pt", image, tmp_path / "m.nii.gz"), "no.pt")
    bad = tmp_path / "bad.pt"
    bad.write_bytes(ckpt.read_bytes()[:100])
    _expect_usage_error(capsys, predict(bad, image, tmp_path / "m.nii.gz"), "bad.pt")
    _four_d(data)
    _expect_usage_error(
        capsys, predict(ckpt, data / "imagesTr" / "c2.nii.gz", tmp_path / "m.nii.gz"), "c2.nii.gz"
    )
    blocker = tmp_path / "blocker"
    blocker.write_text("x")
    _expect_usage_error(capsys, predict(ckpt, image, blocker / "m.nii.gz"), "blocker")
    assert main(predict(ckpt, image, tmp_path / "ok.nii.gz")) == 0


@pytest.mark.parametrize(
    "argv",
    [
        ["bench", "--batch", "2,x"],
        ["federate", "--channels", "8,sixteen"],
        ["train", "--data", "d", "--out", "o", "--spacing", "3,3,mm"],
        ["attack", "--data", "d", "--case", "c", "--out", "o", "--channels", "4,8.5"],
    ],
)
def test_every_comma_list_rejects_a_bad_item_as_a_usage_error(capsys, argv):
    """One parser for every comma list: a bad item exits 2 naming the value, no traceback."""
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "comma-separated list" in err and argv[-1] in err and "Traceback" not in err


def test_comma_list_takes_strings_and_toml_lists():
    from dpseg.cli_types import csv_list

    assert csv_list(int)("8, 16,32,") == (8, 16, 32)
    assert csv_list(float)([3, "1.5"]) == (3.0, 1.5)
