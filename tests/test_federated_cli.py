"""`dpseg federate` end to end on tiny phantoms: reports, --compare, and --resume after a kill."""

import json
import shutil

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

    # The run's secret (the key of every site's sampling and noise) is owner-only, and no
    # leaf of a checkpoint holds it or a key or seed derived from it.
    from dpseg.federated.site import _TAG
    from dpseg.privacy.secret import derive_seed, server_secret, site_secret
    from tests.test_federated import _leaves

    key = straight / "secret.key"
    assert key.stat().st_mode & 0o777 == 0o600
    secret = int(key.read_text())
    keys = {secret, derive_seed(0, server_secret(secret))}
    for k in range(2):
        site_key = derive_seed(0, site_secret(secret, k), k)
        keys |= {site_key, *(derive_seed(site_key, _TAG, p) for p in (1, 2, 3))}
    for engine in ("dpseg", "opacus"):
        for path, leaf in _leaves(load_checkpoint(straight / f"checkpoint_{engine}.pt")):
            assert not (isinstance(leaf, int) and leaf in keys), path
    assert str(secret) not in (straight / "report.json").read_text()

    # "Kill" after round 1: run 1 round, then fresh objects resume from the files to round 2.
    # A copy of the killed run's folder resumes too: both read the same OUT/secret.key, and
    # the resumed rounds agree bit for bit.
    killed = tmp_path / "killed"
    assert main(["federate", *flags, "--rounds", "1", "--out", str(killed)]) == 0
    eps_1 = sum(  # one of the two sites trains each round (--fraction 0.5)
        s["epsilon"]["dpseg"]
        for s in json.loads((killed / "report.json").read_text())["sites"].values()
    )
    twin = tmp_path / "twin"
    shutil.copytree(killed, twin)
    for run in (killed, twin):
        assert main(["federate", *flags, "--rounds", "2", "--out", str(run), "--resume"]) == 0
        assert "resumed after round 1" in capsys.readouterr().out
    for engine in ("dpseg", "opacus"):
        a, b = _weights(killed, engine), _weights(twin, engine)
        assert all(torch.equal(a[k], b[k]) for k in a), engine
        # another secret: the same public flags and seed, other batches and noise
        c = _weights(straight, engine)
        assert not all(torch.equal(a[k], c[k]) for k in a), engine
    # Under one --secret-seed, the killed and resumed run is the uninterrupted one.
    fixed = [*flags, "--secret-seed", "5"]
    assert main(["federate", *fixed, "--rounds", "2", "--out", str(tmp_path / "s2")]) == 0
    assert main(["federate", *fixed, "--rounds", "1", "--out", str(tmp_path / "k2")]) == 0
    assert main(["federate", *fixed, "--rounds", "2", "--out", str(tmp_path / "k2"),
                 "--resume"]) == 0  # fmt: skip
    for engine in ("dpseg", "opacus"):
        a, b = _weights(tmp_path / "s2", engine), _weights(tmp_path / "k2", engine)
        assert all(torch.equal(a[k], b[k]) for k in a), engine
    # A fresh run never takes up a secret left in its folder (its batches and noise would
    # be those of releases already out); a folder holding another run's checkpoints is
    # refused rather than have its secret replaced.
    stale = tmp_path / "stale"
    stale.mkdir()
    (stale / "secret.key").write_text(f"{secret}\n")
    assert main(["federate", *TINY, "--engine", "none", "--rounds", "1", "--out", str(stale)]) == 0
    assert int((stale / "secret.key").read_text()) != secret
    assert main(["federate", *TINY, "--rounds", "1", "--out", str(stale)]) == 2
    assert "checkpoint_none.pt" in capsys.readouterr().err
    resumed = json.loads((killed / "report.json").read_text())
    assert sum(s["epsilon"]["dpseg"] for s in resumed["sites"].values()) > eps_1  # it went on
    reports = [json.loads((tmp_path / r / "report.json").read_text()) for r in ("s2", "k2")]
    assert reports[0]["sites"] == reports[1]["sites"]  # Dice, epsilons, cases: all of it


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
