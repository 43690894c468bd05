"""SecAgg+ on a loopback deployment (``--secagg``), three sites, two rounds, every message the
server sent and received written down (traffic.py):

- round 1 equals the plain in-process run within the bound derived beforehand from the
  clipping range, the bit width and the weights, and no coordinate was clipped;
- the server never received a site's unmasked update (only integers, each masked vector
  unrelated to its site's quantised update), nor a case name or an unnoised figure;
- round 2: site2 trains, writes its release and dies before its masked vector leaves; the
  round goes on with the two others, unmasked from their shares, and site2's ledger counts
  the release that never arrived.

The sites' own updates, to compare against, come from their state on their disks (their
local model after training, minus the global model they started from), read while the
server waits after round 1 (PAUSE) and at the end. Three to five minutes on 2 busy cores
(Flower starts a process for each of SecAgg+'s stages), hence slow."""

from __future__ import annotations

import pytest
import torch

from dpseg.federated.runner import FederatedConfig, load_data, run_federation
from dpseg.federated.site_store import SiteStore
from dpseg.federated.strategies import trainable_state
from dpseg.train.checkpoint import load_checkpoint

pytestmark = pytest.mark.slow

TINY = dict(
    phantoms=12, sites=3, size=16, patch=16, channels=(4, 8), local_steps=2, batch_size=2,
    accountant="rdp", seed=3, secret_seed=29,
)  # fmt: skip
CLIP, BITS = 1.0, 22  # --secagg-clip-range and --secagg-bits (the defaults)


def _bound(n: int, weights: dict, took_part: list[str]) -> float:
    """Derived before the run: each of the n summed vectors is off by less than one
    quantisation step 2C / 2^B, and the sum is scaled by W / sum of the weights into
    FedAvg's mean."""
    return n * (2 * CLIP / 2**BITS) * max(weights.values()) / sum(weights[s] for s in took_part)


def test_secagg_on_loopback_with_a_dropout(tmp_path):
    pytest.importorskip("flwr")
    from flower_harness import (
        UNNOISED,
        assert_only_masked,
        assert_within_bound,
        case_names,
        sent_keys,
        site_names,
    )

    from dpseg.federated.flower.config import model_fn
    from dpseg.federated.flower.deploy import run_flower_deployment

    run_federation(FederatedConfig(**TINY, rounds=1), tmp_path / "sim", progress=False,
                   plots=False, echo=lambda s: None)  # fmt: skip
    plain_w1 = load_checkpoint(tmp_path / "sim" / "checkpoint_dpseg.pt")["weights"]

    cfg = FederatedConfig(**TINY, rounds=2, secagg=True)
    out, traffic, marker = tmp_path / "run", tmp_path / "traffic", tmp_path / "died"
    (out / "flower").mkdir(parents=True)
    pause = out / "flower" / "PAUSE"
    pause.write_text("")  # the server waits after round 1 while the test reads the sites
    seen: dict = {}

    def watch(line, d):
        if line.startswith("paused after round 1") and "w1" not in seen:
            seen["w1"] = torch.load(out / "flower_dpseg_latest.pt", weights_only=True)["weights"]
            seen["models1"] = {s: SiteStore(d.state_dir(k)).load()["model"]
                               for k, s in enumerate(d.names)}  # fmt: skip
            pause.unlink()
        if marker.exists() and "died" not in seen:  # site2's ClientApp died, and its node
            d.unwatched.append(d.nodes[2])
            seen["died"] = True

    report = run_flower_deployment(
        cfg, out, plots=False, threads=torch.get_num_threads(), timeout=1200, round_timeout=300,
        record_traffic=traffic, on_line=watch, echo=print,
        env={"DPSEG_FAULT_AFTER_PERSIST": "site2:2", "DPSEG_FAULT_MARKER": str(marker)},
    )  # fmt: skip
    assert "w1" in seen and seen.get("died")
    r1, r2 = report["rounds"]
    weights = {s: 4 for s in ("site0", "site1", "site2")}  # B / q: 2 x ceil(3 / 2)

    # Round 1: the plain run's model within the bound; nothing clipped.
    w0 = trainable_state(model_fn(cfg, load_data(cfg, out, progress=False)[1])())
    deltas1 = {s: {k: m[k] - w0[k] for k in w0} for s, m in seen["models1"].items()}
    for s, delta in deltas1.items():
        assert 0 < max(float(d.abs().max()) for d in delta.values()) < CLIP, s
    assert r1["took_part"] == ["site0", "site1", "site2"] and r1["secagg"]["summed"] == 3
    bound1 = _bound(3, weights, r1["took_part"])
    assert r1["secagg"]["max_error"] == pytest.approx(bound1, rel=1e-12)
    assert_within_bound(seen["w1"], w0, deltas1, weights, 3, bound1)
    assert_within_bound(plain_w1, w0, deltas1, weights, 3, 0.0)  # the same deltas, in the clear

    # Round 2: site2 is gone after writing its release; the two others are summed.
    assert r2["sites"]["site2"]["status"] == "failed"
    assert r2["took_part"] == ["site0", "site1"] and r2["secagg"]["summed"] == 2
    w2 = torch.load(out / "flower_dpseg.pt", weights_only=True)["weights"]
    deltas2 = {
        s: {k: v - seen["w1"][k] for k, v in SiteStore(out / "flower" / f"node{i}" / "site-state")
            .load()["model"].items() if k in w0}
        for i, s in enumerate(("site0", "site1"))
    }  # fmt: skip
    bound2 = _bound(2, weights, r2["took_part"])
    assert_within_bound(w2, seen["w1"], deltas2, weights, 2, bound2)
    releases = SiteStore(out / "flower" / "node2" / "site-state").releases()
    assert [r["round"] for r in releases] == [1, 2]  # counted although it never arrived

    # What the server received: integers only, each masked vector unrelated to its update.
    names = site_names(traffic)
    assert assert_only_masked(traffic, names, deltas1, weights, CLIP, BITS, round="1") == 3
    assert assert_only_masked(traffic, names, deltas2, weights, CLIP, BITS, round="2") == 2
    text = (traffic / "traffic.jsonl").read_text()
    assert not [n for n in case_names(cfg, out) if n in text]
    assert not sent_keys(traffic) & UNNOISED
    # What it cost, beside plain rounds: in the report (docs/results/secagg_cost measures).
    assert r1["train_bytes"]["received"] > 0 and r1["secagg"]["seconds"] > 0
