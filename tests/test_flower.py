"""dpseg's sites on Flower: the loopback deployment (a SuperLink and one SuperNode per site,
each its own process) against the in-process simulator on the same seed, and the CLI's
answer when Flower is not installed."""

import importlib.util
import json
import os
import time
from pathlib import Path

import pytest
import torch

from dpseg.cli import main
from dpseg.federated.runner import FederatedConfig, run_federation
from dpseg.train.checkpoint import load_checkpoint

# 2 sites x 4 phantoms of 16^3 (3 train + 1 held out each), a (4, 8) U-Net, 2 rounds x 2 DP
# steps: the same workload as tests/test_federated_cli.py's TINY. A fixed secret_seed: the
# sites draw the simulator's batches and noise (tests/test_flower_tls.py runs without one).
TINY = dict(
    phantoms=8, sites=2, size=16, patch=16, channels=(4, 8), local_steps=2, batch_size=2,
    accountant="rdp", rounds=2, seed=3, secret_seed=29,
)  # fmt: skip


def _flower_processes() -> set[int]:
    """Pids of Flower processes of this user (to check that none is left behind)."""
    out = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ")
            uid = (entry / "status").read_text().split("\nUid:")[1].split()[0]
        except (OSError, IndexError):
            continue
        if int(uid) == os.getuid() and (b"flower-" in cmd or b"flwr" in cmd):
            out.add(int(entry.name))
    return out


# About 75-90 s on 2 CPU cores, nearly all of it Flower starting a fresh ClientApp process
# (importing torch, opacus and dpseg: ~5 s) for each of the 5 messages a site receives
# (query, then train and evaluate per round); the training itself takes 0.1 s a round.
@pytest.mark.parametrize("strategy", ["fedadam"])
def test_loopback_deployment_matches_the_simulator(tmp_path, strategy):
    pytest.importorskip("flwr")
    from dpseg.federated.flower.deploy import run_flower_deployment

    # The sites share their loss, Dice and case counts (unnoised) so that the reports can be
    # compared figure by figure; tests/test_flower_sealed.py runs without.
    cfg = FederatedConfig(**TINY, strategy=strategy, share_site_stats=True)
    before = _flower_processes()
    sim_report = run_federation(cfg, tmp_path / "sim", progress=False, plots=False, echo=print)
    start = time.perf_counter()
    # Each site's ClientApp gets the thread count the simulator ran with: torch's CPU kernels
    # sum in an order that depends on it, and bit equality needs the same sums.
    threads = torch.get_num_threads()
    flower_report = run_flower_deployment(
        cfg, tmp_path / "flwr", plots=False,
        threads=threads, timeout=240,
    )  # fmt: skip
    print(f"flower deployment: {time.perf_counter() - start:.1f} s")
    assert _flower_processes() <= before, "Flower processes were left running"

    # The same kind of report as `dpseg federate`.
    assert set(flower_report) == set(sim_report)
    assert (tmp_path / "flwr" / "report.md").exists()
    assert flower_report["engines"] == ["dpseg"] and flower_report["rounds_done"] == {"dpseg": 2}
    assert len(flower_report["rounds"]) == 2
    for rec_f, rec_s in zip(flower_report["rounds"], sim_report["rounds"], strict=True):
        assert set(rec_f) - set(rec_s) == {"train_bytes"} and set(rec_s) <= set(rec_f)
        assert rec_f["train_bytes"]["sent"] > 0 and rec_f["train_bytes"]["received"] > 0
        assert rec_f["sampled"] == rec_s["sampled"]
        for name, site in rec_f["sites"].items():
            assert site["status"] == rec_s["sites"][name]["status"] == "ok"
            assert {"dice", "epsilon", "seconds", "steps", "loss"} <= set(site)
            # The ledger composed across rounds in the node's context, exactly as in-process.
            assert site["epsilon"] == rec_s["sites"][name]["epsilon"]
            assert site["loss"] == rec_s["sites"][name]["loss"]
    assert (
        flower_report["rounds"][1]["sites"]["site0"]["epsilon"]
        > (flower_report["rounds"][0]["sites"]["site0"]["epsilon"])
    )
    for name, site in flower_report["sites"].items():
        ref = sim_report["sites"][name]
        assert site["epsilon"] == ref["epsilon"]
        assert site["noise_multiplier"] == ref["noise_multiplier"]
        assert site["train_cases"] == ref["train_cases"] and site["test_cases"] == ref["test_cases"]
        assert site["cases"] is None  # names never leave a site
        assert site["dice"]["dpseg"] == pytest.approx(ref["dice"]["dpseg"], abs=1e-12)
    assert flower_report["pooled_dice"]["dpseg"] == pytest.approx(
        sim_report["pooled_dice"]["dpseg"], abs=1e-9
    )

    # Same seed, same sampler, same aggregation order: bit-identical global models.
    ours = torch.load(tmp_path / "flwr" / "flower_dpseg.pt", weights_only=True)["weights"]
    ref = load_checkpoint(tmp_path / "sim" / "checkpoint_dpseg.pt")["weights"]
    assert set(ours) == set(ref)
    assert all(torch.equal(ours[k], ref[k]) for k in ref)
    # The per-round copy a killed run keeps holds the same last round.
    latest = torch.load(tmp_path / "flwr" / "flower_dpseg_latest.pt", weights_only=True)
    assert latest["round"] == 2 and all(torch.equal(latest["weights"][k], ref[k]) for k in ref)
    written = json.loads((tmp_path / "flwr" / "report.json").read_text())
    assert written["environment"]["runtime"] == "flower"


def test_runtime_flower_without_flwr_says_what_to_install(tmp_path, monkeypatch, capsys):
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "flwr" else real(name, *a)
    )
    code = main(
        ["federate", "--phantoms", "8", "--sites", "2", "--runtime", "flower",
         "--out", str(tmp_path / "run")]
    )  # fmt: skip
    assert code == 2
    assert "pip install 'dpseg[flower]'" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
