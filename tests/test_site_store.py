"""A Flower site's privacy state on its own disk, without a Flower deployment: the ClientApp's
load/save path run on a Context as a SuperNode would hold it. A node that restarts (a new,
empty Context on the same state-dir) must continue exactly where an uninterrupted node is,
a spent budget must stay spent, and a state older than the site's release log is refused."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("flwr")

from flwr.app import Context, RecordDict  # noqa: E402

from dpseg.federated.flower.client import load_site, save_site  # noqa: E402
from dpseg.federated.flower.config import model_fn, run_config_for  # noqa: E402
from dpseg.federated.runner import FederatedConfig  # noqa: E402
from dpseg.federated.site import BudgetExhausted  # noqa: E402
from dpseg.federated.site_store import RELEASES_FILE, STATE_FILE, SiteStore, StaleSiteState  # noqa: E402
from dpseg.privacy.secret import SECRET_FILE, site_secret  # noqa: E402

TINY = dict(
    phantoms=8, sites=2, size=16, patch=16, channels=(4, 8), local_steps=2, batch_size=2,
    accountant="rdp", rounds=3, seed=3,
)  # fmt: skip


def _context(out, state_dir=None, **cfg) -> Context:
    node = {"site-index": 0}
    if state_dir is not None:
        node["state-dir"] = str(state_dir)
    run_config = run_config_for(FederatedConfig(**{**TINY, **cfg}), out, num_sites=2)
    return Context(run_id=1, node_id=7, node_config=node, state=RecordDict(), run_config=run_config)


def _round(context: Context, r: int, weights: dict) -> dict:
    """What the ClientApp's train does with one message: load, fit, persist, reply."""
    _cfg, site, _data, _ = load_site(context)
    update = site.fit(weights, 2, {})
    save_site(context, site, {"round": r, "steps": update.steps, "epsilon": site.epsilon})
    return {"delta": update.delta, "epsilon": site.epsilon}


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    context = _context(tmp_path_factory.mktemp("w"))
    _cfg, _site, _data, num_classes = load_site(context)
    return model_fn(FederatedConfig(**TINY), num_classes)().state_dict()


def test_a_restarted_node_continues_bit_for_bit_from_its_disk(tmp_path, weights):
    # One node that never restarts (Context.state only), and one restarted for every
    # round, under one --secret-seed (that a restarted node finds its own secret again in
    # its state-dir is test_a_site_keeps_its_own_secret_on_its_node's).
    alive = _context(tmp_path / "a", secret_seed=29)
    reference = [_round(alive, r, weights) for r in (1, 2, 3)]

    state_dir = tmp_path / "hospital-disk"
    got = []
    for r in (1, 2, 3):  # a fresh SuperNode (empty Context.state) for every round
        got.append(_round(_context(tmp_path / "b", state_dir, secret_seed=29), r, weights))
    for ref, ours in zip(reference, got, strict=True):
        assert ours["epsilon"] == ref["epsilon"] > 0
        assert all(torch.equal(ours["delta"][k], ref["delta"][k]) for k in ref["delta"])
    assert reference[0]["epsilon"] < reference[1]["epsilon"] < reference[2]["epsilon"]
    releases = SiteStore(state_dir).releases()
    assert [r["round"] for r in releases] == [1, 2, 3]
    assert [r["epsilon"] for r in releases] == [g["epsilon"] for g in got]
    assert not [p.name for p in state_dir.iterdir() if p.name.endswith(".tmp")]


def test_a_site_keeps_its_own_secret_on_its_node(tmp_path):
    # The key of the site's sampling and noise: drawn from OS entropy on the node the first
    # time, owner-only in its state-dir, the same after a restart; without a state-dir, in
    # the node's Context.state (never sent). Not derived from anything in the run config.
    from dpseg.federated.flower.client import _secret

    cfg = FederatedConfig(**TINY)
    disk = tmp_path / "disk"
    first = _secret(cfg, _context(tmp_path, disk), 0)
    assert (disk / SECRET_FILE).stat().st_mode & 0o777 == 0o600
    assert _secret(cfg, _context(tmp_path, disk), 0) == first  # a restarted node
    assert _secret(cfg, _context(tmp_path, tmp_path / "other-disk"), 0) != first
    memory = _context(tmp_path)
    kept = _secret(cfg, memory, 0)
    assert _secret(cfg, memory, 0) == kept != _secret(cfg, _context(tmp_path), 0)
    # A site with no state begun again draws a new secret, even where an old one was left.
    assert _secret(cfg, _context(tmp_path, disk), 0, fresh=True) != first
    assert _secret(cfg, memory, 0, fresh=True) != kept
    # --secret-seed (tests and reproductions): the simulator's derivation, on every node.
    fixed = FederatedConfig(**TINY, secret_seed=29)
    assert _secret(fixed, _context(tmp_path, disk), 1) == site_secret(29, 1)


def test_a_restarted_node_replays_its_round_from_its_own_secret(tmp_path, weights):
    # No --secret-seed: the node draws its secret. A copy of its disk after round 1 (the
    # hospital's backup) restarted on another node trains round 2 as the node itself does.
    import shutil

    disk = tmp_path / "disk"
    _round(_context(tmp_path, disk), 1, weights)
    shutil.copytree(disk, tmp_path / "backup")
    ours = _round(_context(tmp_path, disk), 2, weights)
    theirs = _round(_context(tmp_path, tmp_path / "backup"), 2, weights)
    assert all(torch.equal(ours["delta"][k], theirs["delta"][k]) for k in ours["delta"])


def test_a_site_begun_again_does_not_replay_a_left_secret(tmp_path, weights):
    # The state-dir lost its state and release log (a new deployment on an old disk) but
    # kept secret.key: the site starts at step 0, and must not draw the old run's batches
    # and noise again. Its first round's update differs from the old first round's.
    disk = tmp_path / "disk"
    old = _round(_context(tmp_path, disk), 1, weights)
    (disk / STATE_FILE).unlink()
    (disk / RELEASES_FILE).unlink()
    again = _round(_context(tmp_path, disk), 1, weights)
    assert again["epsilon"] == old["epsilon"]
    assert not all(torch.equal(again["delta"][k], old["delta"][k]) for k in old["delta"])


def test_a_spent_budget_stays_spent_after_a_restart(tmp_path, weights):
    state_dir = tmp_path / "disk"
    first = _round(_context(tmp_path, state_dir), 1, weights)
    limit = first["epsilon"] * 1.01  # room for one round, not for two
    context = _context(tmp_path, state_dir, max_epsilon=limit)
    _cfg, site, _data, _ = load_site(context)
    with pytest.raises(BudgetExhausted):
        site.fit(weights, 2, {})
    save_site(context, site)  # the refusal is persisted too, as the ClientApp does
    restarted = _context(tmp_path, state_dir, max_epsilon=limit)
    _cfg, site, _data, _ = load_site(restarted)
    assert site.exhausted and site.epsilon == first["epsilon"] <= limit
    with pytest.raises(BudgetExhausted):
        site.fit(weights, 2, {})


def test_a_state_older_than_the_release_log_is_refused(tmp_path, weights):
    state_dir = tmp_path / "disk"
    _round(_context(tmp_path, state_dir), 1, weights)
    backup = (state_dir / STATE_FILE).read_bytes()  # the hospital's backup after round 1
    _round(_context(tmp_path, state_dir), 2, weights)

    (state_dir / STATE_FILE).write_bytes(backup)  # put back: it has spent less than round 2
    with pytest.raises(StaleSiteState, match="older than the log"):
        load_site(_context(tmp_path, state_dir))

    (state_dir / STATE_FILE).unlink()  # lost altogether while the log survived
    with pytest.raises(StaleSiteState, match="ledger is lost"):
        load_site(_context(tmp_path, state_dir))


def test_a_release_line_torn_by_a_crash_is_cut_before_the_next_release(tmp_path):
    store = SiteStore(tmp_path)
    store.record_release({"round": 1, "steps": 2, "epsilon": 0.5})
    with open(tmp_path / RELEASES_FILE, "a") as f:
        f.write('{"round": 2, "ste')  # the crash came mid-append
    assert [r["round"] for r in store.releases()] == [1]
    store.record_release({"round": 2, "steps": 2, "epsilon": 0.7})  # the retried round
    store.record_release({"round": 3, "steps": 2, "epsilon": 0.8})
    assert [(r["round"], r["epsilon"]) for r in store.releases()] == [(1, 0.5), (2, 0.7), (3, 0.8)]
    with open(tmp_path / RELEASES_FILE, "a") as f:  # damage in the middle is not a crash
        f.write('oops\n{"round": 4, "steps": 2, "epsilon": 0.9}\n')
    with pytest.raises(StaleSiteState, match="corrupt"):
        store.releases()


def test_fewer_steps_than_the_log_records_is_refused(tmp_path):
    store = SiteStore(tmp_path)
    store.record_release({"round": 1, "steps": 2, "epsilon": 0.5})
    store.record_release({"round": 2, "steps": 2, "epsilon": 0.5})  # same epsilon: lost update
    store.check_not_behind(0.5, True, steps=4)
    with pytest.raises(StaleSiteState, match="2 DP steps, but"):
        store.check_not_behind(0.5, True, steps=2)


def test_one_state_dir_serves_one_process_at_a_time(tmp_path):
    store = SiteStore(tmp_path)
    with store.lock():
        with pytest.raises(StaleSiteState, match="its own state-dir"):
            with SiteStore(tmp_path).lock():
                pass
    with SiteStore(tmp_path).lock():  # released after the message
        pass


def test_the_flower_server_samples_remote_sites_under_client_level_dp():
    # RemoteSite is a plain dataclass (unhashable): the client-level sampler keys on names.
    from dpseg.federated.flower.remote import RemoteSite
    from dpseg.federated.flower.server import make_simulator

    cfg = FederatedConfig(**TINY, client_clip=1.0, client_noise=1.0, fraction=0.5)
    sites = [RemoteSite(f"site{k}", k, k + 1, 0.5, 2, 1.0, 2, 4) for k in range(2)]
    sim = make_simulator(cfg, sites, num_classes=2)
    draws = []
    for r in range(40):  # the draw of round r + 1 (keyed by the server's secret and r)
        sim.round = r
        draws.append([s.name for s in sim.sample()])
    sim.round = 0
    assert [s.name for s in sim.sample()] == draws[0]  # a resumed server draws it again
    assert {tuple(d) for d in draws} >= {("site0",), ("site1",)}  # each site, independently
    assert all(set(d) <= {"site0", "site1"} for d in draws)


@pytest.mark.parametrize(
    "setting, flag",
    [({"train_sites": ("site0",)}, "--train-sites"), ({"eval_every": 2}, "--eval-every")],
)
def test_settings_flower_does_not_carry_out_are_refused(tmp_path, setting, flag):
    with pytest.raises(ValueError, match=f"{flag}: not carried out on --runtime flower"):
        run_config_for(FederatedConfig(**TINY, **setting), tmp_path, num_sites=2)
