"""Flower sites that never lose their privacy ledger, on a loopback deployment: a SuperNode
killed between rounds and restarted, one that dies inside a round after writing its release
(the server retries it, the ledger counts both releases), and --resume after the whole
deployment stopped. Each takes one to three minutes on 2 cores (Flower starts a process per
message), hence `slow`."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch
from opacus.accountants import RDPAccountant

from dpseg.federated.runner import FederatedConfig, run_federation
from dpseg.federated.site_store import SiteStore
from dpseg.train.checkpoint import load_checkpoint

pytestmark = pytest.mark.slow

# q declared (what 1 / ceil(3 train cases / batch 2) gives), so the sites' epsilons are for
# add/remove adjacency and Opacus's RDP accountant is the hand-run reference below.
TINY = dict(
    phantoms=8, sites=2, size=16, patch=16, channels=(4, 8), local_steps=2, batch_size=2,
    sample_rate=0.5, accountant="rdp", rounds=2, seed=3, secret_seed=29,
)  # fmt: skip


class Stop(Exception):
    """Raised from a watcher to stop the whole deployment."""


@pytest.fixture(scope="module")
def simulated(tmp_path_factory):
    pytest.importorskip("flwr")
    out = tmp_path_factory.mktemp("sim")
    report = run_federation(FederatedConfig(**TINY), out, progress=False, plots=False,
                            echo=lambda s: None)  # fmt: skip
    return report, load_checkpoint(out / "checkpoint_dpseg.pt")["weights"]


def _deploy(out: Path, **kw):
    from dpseg.federated.flower.deploy import run_flower_deployment

    return run_flower_deployment(
        FederatedConfig(**TINY), out, plots=False, threads=torch.get_num_threads(),
        timeout=600, round_timeout=180, echo=print, **kw,
    )  # fmt: skip


def _assert_equal_to(report, out: Path, simulated):
    sim_report, sim_weights = simulated
    for name, site in report["sites"].items():
        assert site["epsilon"] == sim_report["sites"][name]["epsilon"], name
    ours = torch.load(out / "flower_dpseg.pt", weights_only=True)["weights"]
    assert set(ours) == set(sim_weights)
    assert all(torch.equal(ours[k], sim_weights[k]) for k in sim_weights)


def _registered(log: Path, times: int) -> bool:
    return log.exists() and log.read_text(errors="replace").count("SuperNode ID") >= times


def test_a_supernode_restarted_between_rounds_keeps_its_ledger(tmp_path, simulated):
    out = tmp_path / "run"
    (out / "flower").mkdir(parents=True)
    pause = out / "flower" / "PAUSE"
    pause.write_text("")  # the server stops after round 1 until this file goes
    done = []

    def watch(line, d):
        if line.startswith("paused after round 1") and not done:
            d.restart_node(0)  # SIGKILL, then the same node config and state-dir
            log = d.base / "supernode_site0.log"
            deadline = time.monotonic() + 60
            while not _registered(log, 2) and time.monotonic() < deadline:
                time.sleep(0.5)
            done.append(True)
            pause.unlink()

    report = _deploy(out, on_line=watch)
    assert done, "the server never paused"
    _assert_equal_to(report, out, simulated)
    assert all(r["took_part"] == ["site0", "site1"] for r in report["rounds"])
    releases = SiteStore(out / "flower" / "node0" / "site-state").releases()
    assert [r["round"] for r in releases] == [1, 2]


def test_a_site_that_dies_after_writing_its_release_is_retried_and_counted(tmp_path, simulated):
    out = tmp_path / "run"
    out.mkdir()
    marker = tmp_path / "died"
    restarted = []

    def watch(line, d):
        if marker.exists() and not restarted:  # its ClientApp died: the node goes down too
            d.restart_node(0)
            restarted.append(True)

    env = {"DPSEG_FAULT_AFTER_PERSIST": "site0:2", "DPSEG_FAULT_MARKER": str(marker)}
    report = _deploy(out, on_line=watch, env=env)
    assert restarted
    second = report["rounds"][1]
    assert second["retried"] == {"site0": 1}
    assert second["took_part"] == ["site0", "site1"]
    # site0 released round 2 twice: three releases of 2 DP steps; site1 two.
    releases = SiteStore(out / "flower" / "node0" / "site-state").releases()
    assert [r["round"] for r in releases] == [1, 2, 2]
    q = report["sites"]["site0"]["sample_rate"]
    sigma = report["sites"]["site0"]["noise_multiplier"]
    for name, steps in (("site0", 6), ("site1", 4)):
        acc = RDPAccountant()
        for _ in range(steps):
            acc.step(noise_multiplier=sigma, sample_rate=q)
        assert report["sites"][name]["epsilon"]["dpseg"] == pytest.approx(
            acc.get_epsilon(1e-5), rel=1e-9
        ), name
    assert (
        report["sites"]["site0"]["epsilon"]["dpseg"]
        > simulated[0]["sites"]["site0"]["epsilon"]["dpseg"]
    )


def test_resume_after_the_whole_deployment_stopped(tmp_path, simulated):
    out = tmp_path / "run"
    (out / "flower").mkdir(parents=True)
    pause = out / "flower" / "PAUSE"
    pause.write_text("")

    def stop(line, d):
        if line.startswith("paused after round 1"):
            raise Stop

    with pytest.raises(Stop):
        _deploy(out, on_line=stop)
    assert not (out / "flower_dpseg.pt").exists()
    pause.unlink()
    report = _deploy(out, resume=True)
    _assert_equal_to(report, out, simulated)
    assert [r["round"] for r in report["rounds"]] == [1, 2]
