"""`dpseg federate` end to end on tiny phantoms: reports, --compare, and --resume after a kill."""

import json

import pytest
import torch

from dpseg.cli import main
from dpseg.train.checkpoint import load_checkpoint

# 2 sites x 4 phantoms of 16^3, a (4, 8) U-Net, 16^3 patches: about a second per round.
TINY = [
    "--phantoms", "8", "--sites", "2", "--size", "16", "--patch", "16", "--channels", "4,8",
    "--local-steps", "2", "--batch", "2", "--sample-rate", "0.5", "--accountant", "rdp",
    "--no-plots",
]  # fmt: skip


def _weights(run, engine):
    return load_checkpoint(run / f"checkpoint_{engine}.pt")["weights"]


def test_compare_report_and_resume_after_kill(tmp_path, capsys):
    flags = TINY + ["--strategy", "fedadam", "--fraction", "0.5", "--compare", "dpseg,opacus"]
    straight = tmp_path / "straight"
    assert main(["federate", *flags, "--rounds", "2", "--out", str(straight)]) == 0
    out = capsys.readouterr().out
    assert "Training-time penalty" in out and "site1" in out

    report = json.loads((straight / "report.json").read_text())
    assert report["engines"] == ["dpseg", "opacus"]
    assert len(report["rounds"]) == 4
    for rec in report["rounds"]:
        for site in rec["sites"].values():
            assert {"dice", "epsilon", "seconds", "status"} <= set(site)
    for site in report["sites"].values():
        assert set(site["dice"]) == {"dpseg", "opacus"}
        # Same sigma, q and steps under both engines: the same ledger.
        assert site["epsilon"]["dpseg"] == pytest.approx(site["epsilon"]["opacus"])
    assert set(report["seconds_per_round"]) == {"dpseg", "opacus"}
    assert report["penalty"]["dpseg"]["time_ratio"] is None  # no "none" engine to divide by
    md = (straight / "report.md").read_text()
    assert "| site0 |" in md and "Training-time penalty" in md

    # The run's secret (the key of every site's sampling and noise) is owner-only and in
    # neither the report nor a checkpoint.
    key = straight / "secret.key"
    assert key.stat().st_mode & 0o777 == 0o600
    secret = key.read_text().strip()
    assert secret not in (straight / "report.json").read_text()
    assert secret not in (straight / "report.md").read_text()
    assert str(int(secret)) not in repr(load_checkpoint(straight / "checkpoint_dpseg.pt"))

    # "Kill" after round 1: run 1 round, then fresh objects resume from the files to round 2.
    # The killed run is given the straight run's secret, as if it were the same run: its
    # resume must then replay the straight run exactly, from OUT/secret.key.
    killed = tmp_path / "killed"
    killed.mkdir()
    (killed / "secret.key").write_text(key.read_text())
    assert main(["federate", *flags, "--rounds", "1", "--out", str(killed)]) == 0
    eps_1 = json.loads((killed / "report.json").read_text())["sites"]["site0"]["epsilon"]["dpseg"]
    assert main(["federate", *flags, "--rounds", "2", "--out", str(killed), "--resume"]) == 0
    assert "resumed after round 1" in capsys.readouterr().out
    for engine in ("dpseg", "opacus"):
        a, b = _weights(straight, engine), _weights(killed, engine)
        assert all(torch.equal(a[k], b[k]) for k in a), engine
    resumed = json.loads((killed / "report.json").read_text())
    assert resumed["sites"] == report["sites"]
    assert resumed["sites"]["site0"]["epsilon"]["dpseg"] > eps_1  # the ledger went on


def test_federate_usage_errors(tmp_path, capsys):
    assert main(["federate", "--out", str(tmp_path / "a")]) == 2
    assert "--phantoms" in capsys.readouterr().err
    assert main(["federate", "--phantoms", "4", "--sites", "3", "--out", str(tmp_path / "b")]) == 2
    assert "each site needs at least 2" in capsys.readouterr().err
    assert main(["federate", *TINY, "--patch", "15", "--out", str(tmp_path / "c")]) == 2
    assert "divisible by 2" in capsys.readouterr().err
    run = tmp_path / "d"
    assert main(["federate", *TINY, "--rounds", "1", "--engine", "none", "--out", str(run)]) == 0
    capsys.readouterr()
    assert main(["federate", *TINY, "--rounds", "1", "--engine", "none", "--out", str(run)]) == 2
    assert "--resume" in capsys.readouterr().err
    assert main(["federate", *TINY, "--lr", "0.1", "--rounds", "2", "--engine", "none",
                 "--out", str(run), "--resume"]) == 2  # fmt: skip
    assert "lr: 0.003 -> 0.1" in capsys.readouterr().err
