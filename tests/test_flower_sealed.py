"""A sealed federation, with dpseg's ClientApp and ServerApp and Flower's SecAgg+ run in this
process (tests/flower_harness.py: only the transport is replaced). Three sites, one round:

- SecAgg+ equals the plain round within a bound derived from the quantisation parameters,
  and no coordinate was clipped; each site's DP noise and ledger are unchanged;
- the server never receives a site's unmasked update: everything it received under SecAgg+
  is written down (traffic.py) and holds no float array, and each masked vector is
  unrelated to its site's quantised update;
- no site message holds a case name or an unnoised figure unless --share-site-stats;
- a site that drops out after sharing its keys is unmasked from the others' shares;
- a hostile weight that makes the secure sum NaN: the round is refused, the model kept, no
  site named;
- without SecAgg+, a NaN site and a 1000x site are refused, and the model is the round
  without their updates, bit for bit.

The loopback deployments (tests/test_flower_tls.py, tests/test_flower_secagg.py) run the
same through real processes. About 2 minutes on 2 busy cores, hence slow."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("flwr")

from flower_harness import (  # noqa: E402
    UNNOISED,
    Federation,
    assert_only_masked,
    assert_within_bound,
    case_names,
    received,
    sent_keys,
)
from flwr.app import ArrayRecord, Message, RecordDict  # noqa: E402
from flwr.compat.common import recorddict_compat as compat  # noqa: E402

from dpseg.federated.flower import secagg  # noqa: E402
from dpseg.federated.report import build_report, write_report  # noqa: E402
from dpseg.federated.runner import FederatedConfig  # noqa: E402
from dpseg.federated.site_store import SiteStore  # noqa: E402
from dpseg.federated.strategies import FedAvg, SiteUpdate  # noqa: E402

pytestmark = pytest.mark.slow

# 3 sites x 4 phantoms of 16^3 (3 train + 1 held out each), a (4, 8) U-Net, 2 DP steps.
TINY = dict(
    phantoms=12, sites=3, size=16, patch=16, channels=(4, 8), local_steps=2, batch_size=2,
    accountant="rdp", rounds=1, seed=3, secret_seed=29,
)  # fmt: skip
CLIP, BITS = 1.0, 22  # --secagg-clip-range and --secagg-bits (the defaults)


def _run(out: Path, *, record=True, train_mods=None, crash=None, **settings):
    fed = Federation(FederatedConfig(**TINY, **settings), out / "run", train_mods=train_mods,
                     record=out / "traffic" if record else None)  # fmt: skip
    for site, when in (crash or {}).items():
        fed.inner.crash[fed.node(site)] = when
    w0 = {k: v.clone() for k, v in fed.sim.weights.items()}
    rec = fed.round(timeout=3.0)
    return SimpleNamespace(fed=fed, w0=w0, rec=rec, traffic=out / "traffic")


@pytest.fixture(scope="module")
def plain(tmp_path_factory):
    run = _run(tmp_path_factory.mktemp("plain"))
    names = {run.fed.node(s): s for s in run.fed.names}
    run.deltas = {}  # what each site sent the server in the clear
    for msg, arrays in received(run.traffic, "train"):
        keys = [k for k in arrays if k.startswith("delta|")]
        run.deltas[names[msg["node"]]] = {k[6:]: torch.from_numpy(arrays[k]) for k in keys}
    return run


@pytest.fixture(scope="module")
def secure(tmp_path_factory):
    return _run(tmp_path_factory.mktemp("secure"), secagg=True)


def _weights(fed) -> dict[str, int]:
    return {s.name: s.weight for s in fed.sites}


def test_secagg_equals_the_plain_round_within_the_quantisation_bound(plain, secure):
    assert secure.rec["took_part"] == plain.rec["took_part"] == ["site0", "site1", "site2"]
    assert secure.rec["secagg"]["summed"] == 3 and secure.rec["secagg"]["threshold"] == 2
    weights = _weights(secure.fed)
    top, total = max(weights.values()), sum(weights.values())
    # Derived before the run: each of n = 3 summed vectors is off by less than one step
    # 2C / 2^B; the sum is scaled by W / sum_k w_k into FedAvg's mean.
    bound = 3 * (2 * CLIP / 2**BITS) * top / total
    assert secure.rec["secagg"]["max_error"] == pytest.approx(bound, rel=1e-12)
    # No coordinate was clipped: each site's weighted update lay inside [-C, C] (a site whose
    # update does not fit refuses to send it, and every site said ok).
    for site, delta in plain.deltas.items():
        peak = max(float(d.abs().max()) for d in delta.values()) * weights[site] / top
        assert 0 < peak < CLIP, site
    assert_within_bound(secure.fed.sim.weights, plain.w0, plain.deltas, weights, 3, bound)
    assert any(  # and it is the quantised sum, not the plain one in disguise
        not torch.equal(secure.fed.sim.weights[k], plain.fed.sim.weights[k]) for k in plain.w0
    )
    # Each site's DP training is untouched: the same local model, epsilon and ledger.
    for site in secure.fed.names:
        ours = SiteStore(secure.fed.state_dir(site)).load()["model"]
        theirs = SiteStore(plain.fed.state_dir(site)).load()["model"]
        assert all(torch.equal(ours[k], theirs[k]) for k in theirs), site
        assert secure.rec["sites"][site]["epsilon"] == plain.rec["sites"][site]["epsilon"] > 0
        assert [r["round"] for r in SiteStore(secure.fed.state_dir(site)).releases()] == [1]


def test_the_server_never_receives_a_sites_update_under_secagg(plain, secure):
    names = {secure.fed.node(s): s for s in secure.fed.names}
    masked = assert_only_masked(
        secure.traffic, names, plain.deltas, _weights(secure.fed), CLIP, BITS
    )
    assert masked == 3  # one masked vector a site, and nothing else with its update


def test_no_site_message_holds_a_case_name_or_an_unnoised_figure(plain, secure, tmp_path):
    names = case_names(plain.fed.cfg, plain.fed.out)
    assert len(names) == 12
    shared = _run(tmp_path, share_site_stats=True)
    for run in (plain, secure, shared):
        text = (run.traffic / "traffic.jsonl").read_text()
        assert not [n for n in names if n in text]  # never, whatever the flags
    for run in (plain, secure):
        assert not sent_keys(run.traffic) & UNNOISED
    # With the flag the figures come, and the report marks them outside epsilon.
    assert {"loss", "dice", "case_dice", "train_cases", "seconds"} <= sent_keys(shared.traffic)
    sigmas = {s.name: s.noise_multiplier for s in shared.fed.sites}
    for run, figures in ((plain, False), (shared, True)):
        report = build_report(run.fed.cfg, {"dpseg": run.fed.sim}, run.fed.sites, sigmas,
                              {"runtime": "flower"})  # fmt: skip
        assert bool(report["outside_epsilon"]["figures"]) is figures
        assert all(s["cases"] is None for s in report["sites"].values())
        folder = tmp_path / f"report_{figures}"
        folder.mkdir()
        write_report(report, folder, plots=True)  # no Dice, no counts: still a report
        md = (folder / "report.md").read_text()
        assert ("Not covered by the epsilons above" in md) is figures
        assert ("Nothing in this report is outside epsilon" in md) is not figures
    assert set(shared.rec["cases"]) == {f"site{k}/0" for k in range(3)}
    # The site's own validation stays on its disk, names and all.
    local = (plain.fed.state_dir("site0") / "evaluation.jsonl").read_text()
    assert any(n in local for n in names)


def test_a_site_that_drops_out_under_secagg_is_unmasked_from_the_others_shares(plain, tmp_path):
    # site2 trains, writes its release, and dies before its masked vector leaves.
    run = _run(tmp_path, secagg=True, crash={"site2": lambda m: secagg.is_fitins(m.content)})
    assert run.rec["took_part"] == ["site0", "site1"]
    assert run.rec["sites"]["site2"]["status"] == "failed"
    assert run.rec["secagg"]["summed"] == 2
    weights = _weights(run.fed)
    survivors = {s: plain.deltas[s] for s in ("site0", "site1")}
    bound = 2 * (2 * CLIP / 2**BITS) * max(weights.values()) / (weights["site0"] + weights["site1"])
    assert run.rec["secagg"]["max_error"] == pytest.approx(bound, rel=1e-12)
    assert_within_bound(run.fed.sim.weights, plain.w0, survivors, weights, 2, bound)
    # Its release is in its ledger although its update never arrived.
    assert [r["round"] for r in SiteStore(run.fed.state_dir("site2")).releases()] == [1]
    assert run.rec["sites"]["site2"]["epsilon"] == plain.rec["sites"]["site2"]["epsilon"]


def _unmask_stage(msg: Message) -> bool:
    record = msg.content.config_records.get("secaggplus_configs")
    return record is not None and record.get("stage") == "unmask"


def test_a_round_that_loses_too_many_sites_halts_and_keeps_the_model(tmp_path):
    # site2 dies before its masked vector leaves, site1 before its shares do: one share of
    # each secret is left, 2 are needed. The round is refused; nobody's update is used.
    crash = {"site2": lambda m: secagg.is_fitins(m.content), "site1": _unmask_stage}
    run = _run(tmp_path, record=False, secagg=True, crash=crash)
    assert "secure aggregation stopped before unmasking" in run.rec["refused_round"]
    assert run.rec["took_part"] == []
    assert all(torch.equal(run.fed.sim.weights[k], run.w0[k]) for k in run.w0)
    assert all(e["epsilon"] > 0 for e in run.rec["sites"].values())  # their releases count


def _forge_weight(slot: int):
    """A hostile site's mod inside SecAgg+'s: it trains honestly and then puts ``slot`` in
    its weight slot. With the others' two slots of 1, -2 makes the total 0: Flower divides
    by it, and the sum comes out inf/NaN."""

    def mod(msg: Message, context, call_next) -> Message:
        reply = call_next(msg, context)
        fitres = compat.recorddict_to_fitres(reply.content, keep_input=True)
        fitres.num_examples = slot
        content: RecordDict = compat.fitres_to_recorddict(fitres, keep_input=True)
        return Message(content, reply_to=msg)

    return mod


# Flower's workflow divides by the forged total of 0 (numpy: inf, with this warning).
@pytest.mark.filterwarnings("ignore:divide by zero encountered:RuntimeWarning")
def test_a_nan_sum_under_secagg_is_refused_and_the_model_kept(tmp_path):
    run = _run(tmp_path, record=False, secagg=True, train_mods={1: [_forge_weight(-2)]})
    assert "the securely aggregated sum is not finite" in run.rec["refused_round"]
    assert all(torch.equal(run.fed.sim.weights[k], run.w0[k]) for k in run.w0)
    assert run.rec["took_part"] == [] and run.rec["refused"] == []  # no site can be named
    assert all(e["status"] == "ok" for e in run.rec["sites"].values())
    report = build_report(run.fed.cfg, {"dpseg": run.fed.sim}, run.fed.sites,
                          {s.name: 1.0 for s in run.fed.sites}, {"runtime": "flower"})  # fmt: skip
    assert [r["round"] for r in report["refused_rounds"]] == [1]
    assert report["refused_updates"] == []


def _tamper(change):
    def mod(msg: Message, context, call_next) -> Message:
        reply = call_next(msg, context)
        delta = {k: change(v) for k, v in reply.content["delta"].to_torch_state_dict().items()}
        content = RecordDict({"delta": ArrayRecord(delta), "result": reply.content["result"]})
        return Message(content, reply_to=msg)

    return mod


def _nan_first(v: torch.Tensor) -> torch.Tensor:
    v = v.clone()
    v.view(-1)[0] = float("nan")
    return v


def test_without_secagg_a_nan_site_and_a_1000x_site_are_refused(plain, tmp_path):
    honest = max(
        float(sum((d.double() ** 2).sum() for d in delta.values())) ** 0.5
        for delta in plain.deltas.values()
    )
    run = _run(tmp_path, record=False, max_update_norm=10 * honest,
               train_mods={1: [_tamper(_nan_first)], 2: [_tamper(lambda v: 1000 * v)]})  # fmt: skip
    rec = run.rec
    assert rec["took_part"] == ["site0"]
    assert [(r["site"], r["reason"].split(" ")[0]) for r in rec["refused"]] == [
        ("site1", "non-finite"), ("site2", "update"),
    ]  # fmt: skip
    # The model is the round without those updates: site0's alone, bit for bit.
    only = SiteUpdate("site0", plain.deltas["site0"], 0, weight=4.0)
    want = FedAvg().aggregate(plain.w0, [only])
    assert all(torch.equal(run.fed.sim.weights[k], want[k]) for k in want)
    report = build_report(run.fed.cfg, {"dpseg": run.fed.sim}, run.fed.sites,
                          {s.name: 1.0 for s in run.fed.sites}, {"runtime": "flower"})  # fmt: skip
    assert [(r["round"], r["site"]) for r in report["refused_updates"]] == [
        (1, "site1"), (1, "site2"),
    ]  # fmt: skip
    assert "above --max-update-norm" in report["refused_updates"][1]["reason"]


def test_a_site_whose_update_does_not_fit_the_clipping_range_sends_none(tmp_path):
    # C = 1e-5 is far below the updates' coordinates: SecAgg+ would clip them, changing the
    # mean unseen, so every site refuses (without telling the server by how much).
    run = _run(tmp_path, record=False, secagg=True, secagg_clip_range=1e-5)
    for entry in run.rec["sites"].values():
        assert entry["status"] == "failed"
        assert entry["error"].endswith("SecAgg+ would clip it; raise --secagg-clip-range")
        assert "it is" not in entry["error"]
    assert run.rec["took_part"] == [] and "refused_round" not in run.rec
    assert all(torch.equal(run.fed.sim.weights[k], run.w0[k]) for k in run.w0)
