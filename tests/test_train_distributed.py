"""`dpseg train --nproc 2`: torchrun, two gloo processes, the distributed DP step; the run
folder, epsilon and resume as a single-process run has them."""

import json

import pytest
import torch

from dpseg.cli import main
from dpseg.data import write_phantom_dataset
from dpseg.train.checkpoint import load_checkpoint

TINY = ["--patch", "16", "--batch", "4", "--channels", "4,8", "--quiet", "--epsilon-every", "1"]


@pytest.fixture(scope="module")
def phantoms(tmp_path_factory):
    out = tmp_path_factory.mktemp("phantoms")
    write_phantom_dataset(out, cases=10, sites=1, size=24, seed=0, progress=False)
    return out


def _report(run):
    return json.loads((run / "report.json").read_text())


def test_two_processes_train_with_the_single_process_ledger_and_resume(phantoms, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    base = ["train", "--data", str(phantoms), *TINY, "--steps", "3"]
    assert main([*base, "--out", str(one)]) == 0
    assert main([*base, "--out", str(two), "--nproc", "2", "--threads", "1"]) == 0
    r1, r2 = _report(one), _report(two)
    assert r2["nproc"] == 2 and r2["threads_per_process"] == 1 and r1["nproc"] == 1
    # The same global q, sigma and steps: the same epsilon, the same expected batch.
    assert r2["epsilon"] == r1["epsilon"] > 0
    assert r2["sample_rate"] == r1["sample_rate"] and r2["steps"] == 3
    assert r2["samples_per_second"] > 0 and r2["dice"] is not None
    ckpt = load_checkpoint(two / "checkpoint.pt")
    assert not any(k.startswith(("module.", "_module.")) for k in ckpt["model"])
    assert ckpt["optimizer"]["dpseg"]["steps_taken"] == 3
    # Resume on two processes: the ledger continues, epsilon grows.
    assert main(["train", "--out", str(two), "--resume", "--steps", "5", "--quiet"]) == 0
    resumed = _report(two)
    assert resumed["steps"] == 5 and resumed["resumed_from_step"] == 3
    assert resumed["epsilon"] > r2["epsilon"]
    assert load_checkpoint(two / "checkpoint.pt")["optimizer"]["dpseg"]["steps_taken"] == 5


def test_nproc_usage_errors(phantoms, tmp_path, capsys):
    argv = ["train", "--data", str(phantoms), "--out", str(tmp_path / "x"), *TINY]
    assert main([*argv, "--nproc", "0"]) == 2
    assert "nproc must be >= 1" in capsys.readouterr().err
    assert main([*argv, "--nproc", "2", "--engine", "opacus"]) == 2
    assert "use engine 'dpseg'" in capsys.readouterr().err
    assert torch.get_num_threads() >= 1
