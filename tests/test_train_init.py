"""`dpseg train --init`: public pretraining loads by name and shape, records where the weights
came from, and refuses weights that saw any case of the run's data (they would publish those
patients outside the epsilon)."""

import json
import shutil
from pathlib import Path

import pytest
import torch

from dpseg.cli import main
from dpseg.data import DataError, write_phantom_dataset
from dpseg.models import UNet
from dpseg.train.init_weights import apply_init, read_init

TINY = ["--patch", "16", "--batch", "2", "--channels", "4,8", "--quiet", "--steps", "2"]


def load_init(model, path, data, cases):
    return apply_init(model, *read_init(path, data, cases))


def _unet(classes: int, seed: int) -> UNet:
    torch.manual_seed(seed)
    return UNet(3, 1, classes, channels=(4, 8), norm="group")


def test_loads_matching_tensors_and_keeps_a_head_for_other_classes_fresh(tmp_path):
    source, target = _unet(2, 0), _unet(3, 1)
    fresh = {k: v.clone() for k, v in target.state_dict().items()}
    torch.save(source.state_dict(), tmp_path / "w.pt")
    record = load_init(target, str(tmp_path / "w.pt"), str(tmp_path / "data"), ["case_0"])
    src, got = source.state_dict(), target.state_dict()
    kept = set(record["kept_fresh"])
    assert kept == {"head.weight", "head.bias"}
    for name, value in got.items():
        if name in kept:  # the output layer: 3 classes against the source's 2
            assert src[name].shape != value.shape and torch.equal(value, fresh[name])
        else:
            assert torch.equal(value, src[name]), name
    assert record["provenance"] == "not recorded" and len(record["sha256"]) == 64


def test_refuses_weights_trained_on_the_runs_cases_or_folder(tmp_path):
    model = _unet(2, 0)
    payload = {"model": model.state_dict(), "config": {"data": "/elsewhere", "dp": False},
               "split": {"train": ["a", "case_7"], "val": ["b"]}}  # fmt: skip
    torch.save(payload, tmp_path / "ckpt.pt")
    with pytest.raises(DataError, match="1 case\\(s\\) named as in --data \\(case_7\\).*publish"):
        load_init(_unet(2, 1), str(tmp_path / "ckpt.pt"), str(tmp_path), ["case_7", "c"])
    payload["config"]["data"] = str(tmp_path / "data" / "..")  # the same folder, spelt apart
    payload["split"] = {"train": ["x"], "val": []}
    torch.save(payload, tmp_path / "ckpt.pt")
    with pytest.raises(DataError, match="this run's data folder"):
        load_init(_unet(2, 1), str(tmp_path / "ckpt.pt"), str(tmp_path), ["case_7"])
    # disjoint cases, another folder: loaded, and the source is on record
    payload["config"]["data"] = "/public/phantoms"
    torch.save(payload, tmp_path / "ckpt.pt")
    record = load_init(_unet(2, 1), str(tmp_path / "ckpt.pt"), str(tmp_path), ["case_7"])
    assert record["provenance"] == "recorded" and record["source_data"] == "/public/phantoms"
    assert record["source_cases"] == 1 and not record["kept_fresh"]


def test_refuses_files_that_are_not_weights_or_do_not_fit(tmp_path):
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(DataError, match="torch.save"):
        load_init(_unet(2, 0), str(tmp_path / "junk.pt"), str(tmp_path), [])
    torch.save({"other.weight": torch.zeros(3)}, tmp_path / "other.pt")
    with pytest.raises(DataError, match="none of its weight tensors"):
        load_init(_unet(2, 0), str(tmp_path / "other.pt"), str(tmp_path), [])
    with pytest.raises(DataError, match="no such file"):
        load_init(_unet(2, 0), str(tmp_path / "missing.pt"), str(tmp_path), [])
    # only the biases and norms of a 2-D U-Net fit a 3-D one: not a model to start from
    torch.manual_seed(0)
    torch.save(UNet(2, 1, 2, channels=(4, 8), norm="group").state_dict(), tmp_path / "2d.pt")
    with pytest.raises(DataError, match="none of its weight tensors"):
        load_init(_unet(2, 0), str(tmp_path / "2d.pt"), str(tmp_path), [])


def test_ddp_and_opacus_prefixes_are_dropped(tmp_path):
    source = _unet(2, 0)
    prefixed = {f"_module.{k}": v for k, v in source.state_dict().items()}
    torch.save(prefixed, tmp_path / "w.pt")
    target = _unet(2, 1)
    record = load_init(target, str(tmp_path / "w.pt"), str(tmp_path), [])
    assert not record["kept_fresh"]
    assert all(torch.equal(v, source.state_dict()[k]) for k, v in target.state_dict().items())


def test_weights_cannot_be_laundered_through_an_intermediate_run(tmp_path):
    # A saw case_7; B started from A and trained on public cases only; C starts from B
    a = {"model": _unet(2, 0).state_dict(), "config": {"data": "/hospital", "dp": False},
         "split": {"train": ["case_7"], "val": []}}  # fmt: skip
    torch.save(a, tmp_path / "a.pt")
    _, record_a = read_init(str(tmp_path / "a.pt"), "/public", ["p1", "p2"])
    b = {"model": _unet(2, 1).state_dict(), "config": {"data": "/public", "dp": False},
         "split": {"train": ["p1", "p2"], "val": []}, "init": record_a}  # fmt: skip
    torch.save(b, tmp_path / "b.pt")
    with pytest.raises(DataError, match="through .*a.pt.*case_7"):
        read_init(str(tmp_path / "b.pt"), "/hospital2", ["case_7"])
    _, record_b = read_init(str(tmp_path / "b.pt"), "/elsewhere", ["x1"])
    assert [s["data"] for s in record_b["lineage"]] == [
        str(Path("/public").resolve()),
        str(Path("/hospital").resolve()),
    ]
    # a bare state_dict somewhere in the chain: accepted, and said
    bare = {"model": _unet(2, 1).state_dict(), "config": {"data": "/p"}, "split": {},
            "init": {"lineage": [{"data": None, "cases": [], "known": False}]}}  # fmt: skip
    torch.save(bare, tmp_path / "bare.pt")
    assert read_init(str(tmp_path / "bare.pt"), "/q", [])[1]["provenance"] == "partly not recorded"


def test_federated_checkpoints_are_checked_against_their_cases(tmp_path):
    folder = tmp_path / "fed_data"
    write_phantom_dataset(folder, cases=3, sites=1, size=16, seed=0, progress=False)
    fed = {"federated": True, "round": 2, "weights": _unet(2, 0).state_dict(),
           "extra": {"config": {"data": str(folder), "split": None}}}  # fmt: skip
    torch.save(fed, tmp_path / "fed.pt")
    with pytest.raises(DataError, match="phantom_0000"):
        read_init(str(tmp_path / "fed.pt"), str(tmp_path / "copy"), ["phantom_0000", "z"])
    _, record = read_init(str(tmp_path / "fed.pt"), str(tmp_path / "other"), ["z"])
    assert record["source_cases"] == 3
    fed["extra"]["config"]["data"] = str(tmp_path / "gone")  # its cases cannot be read here
    torch.save(fed, tmp_path / "fed.pt")
    with pytest.raises(DataError, match="cannot be read here"):
        read_init(str(tmp_path / "fed.pt"), str(tmp_path / "other"), ["z"])
    fed["extra"]["config"]["data"] = None  # trained on generated phantoms: no patient
    torch.save(fed, tmp_path / "fed.pt")
    assert read_init(str(tmp_path / "fed.pt"), str(folder), ["z"])[1]["provenance"] == "recorded"


def _renamed(src, dst, prefix):
    """A copy of an MSD folder whose cases carry other names (another collection)."""
    shutil.copytree(src, dst)
    meta = json.loads((dst / "dataset.json").read_text())
    for entry in meta["training"]:
        for key in ("image", "label"):
            old = dst / entry[key]
            new = old.with_name(old.name.replace("phantom_", prefix))
            old.rename(new)
            entry[key] = entry[key].replace("phantom_", prefix)
    (dst / "dataset.json").write_text(json.dumps(meta))
    return dst


def test_cli_pretrain_then_fine_tune_with_dp(tmp_path, capsys):
    public = tmp_path / "public"
    write_phantom_dataset(public, cases=4, sites=1, size=24, seed=0, progress=False)
    private = tmp_path / "private"
    write_phantom_dataset(tmp_path / "gen", cases=4, sites=1, size=24, seed=1, progress=False)
    _renamed(tmp_path / "gen", private, "hospital_")
    base = ["train", *TINY, "--val-fraction", "0"]
    assert main([*base, "--data", str(public), "--out", str(tmp_path / "pre"), "--no-dp"]) == 0
    init = str(tmp_path / "pre" / "checkpoint.pt")

    # the same patients again: refused, nothing trained
    capsys.readouterr()
    assert main([*base, "--data", str(public), "--out", str(tmp_path / "x"), "--init", init]) == 2
    assert "publish" in capsys.readouterr().err
    assert not (tmp_path / "x" / "checkpoint.pt").exists()

    run = tmp_path / "dp"
    assert main([*base, "--data", str(private), "--out", str(run), "--init", init,
                 "--noise-multiplier", "1.0"]) == 0  # fmt: skip
    report = json.loads((run / "report.json").read_text())
    assert report["init"]["source_data"] == str(public)
    assert report["init"]["source_cases"] == 4 and report["init"]["source_dp"] is False
    assert report["init"]["loaded"] > 0 and not report["init"]["kept_fresh"]
    assert "started from" in (run / "report.md").read_text()
    # resumed, the record stays with the model
    assert main(["train", "--data", str(private), "--out", str(run), "--resume", "--steps", "3",
                 "--quiet"]) == 0  # fmt: skip
    assert json.loads((run / "report.json").read_text())["init"] == report["init"]
    capsys.readouterr()
    # a run begun from scratch cannot take an init on resume (its weights are its own)
    assert main(["train", "--data", str(public), "--out", str(tmp_path / "pre"), "--resume",
                 "--init", str(run / "checkpoint.pt"), "--steps", "4", "--quiet"]) == 2  # fmt: skip
    assert "--init applies to a new run only" in capsys.readouterr().err
