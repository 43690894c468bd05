"""The ClientApp: one dpseg ``Site`` per SuperNode.

- ``query``: the site says who it is and its public settings: name, index, sampling rate,
  steps per epoch, noise multiplier, FedAvg weight B / q, number of classes.
- ``train``: global weights and the round's settings in; the weight change out (a
  message-API ArrayRecord, or under --secagg the FitRes that SecAgg+ masks), with the
  round's status and DP steps.
- ``evaluate``: the new global weights in; the site's epsilon after the round out. It goes
  to every site each round, trained or not, as the simulator records every site's ledger
  every round.

What leaves a site, and nothing else: its update (the output of DP-SGD on its patients,
covered by its epsilon), its epsilon, its status and the public settings above. The
training loss, its held-out Dice (per site and per case), its case counts and its timings
are computed from its patients without noise: they stay on the site (its evaluation goes to
``evaluation.jsonl`` in its state-dir) unless the run says ``--share-site-stats``, and the
report then marks them outside epsilon. Case names never leave: per-case Dice travels under
"site/k" keys, and a failure is reported by its exception type (its message, which may name
a file, stays in the site's log).

An honest site also refuses to send an update the server would refuse (non-finite, norm
beyond --max-update-norm) or that SecAgg+ would have to clip (a coordinate beyond
--secagg-clip-range): under SecAgg+ the server cannot check a single update, so the site
must.

Flower rebuilds the ClientApp for every message (with SuperNode isolation, in a fresh
process), so a site keeps everything that must survive a round (``Site.state_dict()``) on
its own disk (node config ``state-dir``, see site_store.py), or without one in the node's
``Context.state``, a record Flower keeps on that node and never sends. Both are written
before the reply leaves the node.

Each node's own configuration (``flower-supernode --node-config``) says which site it is and
where its patients are: ``site-index`` (and optionally ``site``, its name), ``data`` (an MSD
folder holding this site's cases; without it the node reads the phantoms the launcher wrote
into ``out``) and ``state-dir``.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import secrets
import time
import traceback
from dataclasses import replace
from pathlib import Path

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp

from dpseg.federated.flower import secagg
from dpseg.federated.flower.config import load_config, model_fn, set_threads
from dpseg.federated.runner import FederatedConfig, load_data
from dpseg.federated.site import BudgetExhausted, Site, poisson_rate
from dpseg.federated.site_store import SiteStore
from dpseg.federated.sitedata import SiteData, evaluate_dice
from dpseg.federated.strategies import Weights, trainable_state
from dpseg.federated.update_checks import check_update
from dpseg.privacy.secret import new_secret, run_secret, site_secret

__all__ = ["load_site", "make_client_app", "save_site"]

log = logging.getLogger("dpseg.federated")
STATE_KEY = "dpseg-site"  # the record in Context.state that holds Site.state_dict()
SECRET_KEY = "dpseg-secret"  # and the site's secret, without a state-dir
EVALUATION_FILE = "evaluation.jsonl"  # in the state-dir: the site's own validation


# --- the site ----------------------------------------------------------------------------
def _site_data(cfg: FederatedConfig, context: Context) -> tuple[SiteData, int, int]:
    """(this node's data, its site index, number of classes) from the node config."""
    node = context.node_config
    if "data" in node:  # a site on its own machine: its own MSD folder
        cfg = replace(cfg, data=str(node["data"]), phantoms=None, partition="site", sites=None)
    sites, num_classes = load_data(cfg, Path(str(context.run_config["out"])), progress=False)
    if "site" in node:
        names = [s.name for s in sites]
        if str(node["site"]) not in names:
            raise ValueError(f"node config site={node['site']!r} is not among the sites {names}")
        data = sites[names.index(str(node["site"]))]
    elif "data" in node and len(sites) == 1:
        data = sites[0]
    elif "site-index" in node:
        data = sites[int(node["site-index"])]
    else:
        raise ValueError("give the SuperNode --node-config 'site-index=K' (and data=DIR)")
    index = int(node.get("site-index", [s.name for s in sites].index(data.name)))
    return data, index, num_classes


def _sigma(cfg: FederatedConfig, data: SiteData) -> float:
    from dpseg.federated.runner import noise_multipliers

    return noise_multipliers(cfg, [data])[data.name]


def _build_site(
    cfg: FederatedConfig, data: SiteData, index: int, num_classes: int, secret: int
) -> Site:
    """The site as runner.build_simulator builds site ``index`` (with the same secret, the
    same batches and noise)."""
    from dpseg.federated.runner import site_config, site_patches

    return Site(
        data.name, index, site_patches(cfg, data, index), model_fn(cfg, num_classes),
        site_config(cfg, cfg.engines[0]), noise_multiplier=_sigma(cfg, data), seed=cfg.seed,
        secret=secret,
    )  # fmt: skip


def _secret(cfg: FederatedConfig, context: Context, index: int, fresh: bool = False) -> int:
    """The site's own secret (dpseg.privacy.secret): ``secret.key`` in its state-dir,
    drawn from OS entropy; without a state-dir, a record in Context.state (never sent).
    ``fresh`` (the site holds no state: it has taken no step) draws a new one, replacing
    any left behind, so that a site begun again never replays released batches and noise.
    --secret-seed derives it as the simulator does, for the tests."""
    if cfg.secret_seed is not None:
        return site_secret(cfg.secret_seed, index)
    folder = context.node_config.get("state-dir")
    if folder:
        return (new_secret if fresh else run_secret)(Path(str(folder)))
    if fresh or SECRET_KEY not in context.state:
        context.state[SECRET_KEY] = ConfigRecord({"secret": secrets.randbits(63)})
    return int(context.state[SECRET_KEY]["secret"])


def _store(context: Context) -> SiteStore | None:
    """The site's own disk (node config ``state-dir``), where its privacy state outlives
    the SuperNode; without it the state lives in Context.state only, and a restarted node
    would begin its ledger at zero."""
    folder = context.node_config.get("state-dir")
    return SiteStore(str(folder)) if folder else None


def load_site(context: Context) -> tuple[FederatedConfig, Site, SiteData, int]:
    cfg = load_config(context)
    data, index, num_classes = _site_data(cfg, context)
    store = _store(context)
    state = store.load() if store is not None else None  # the disk first: it is what survives
    if state is None and STATE_KEY in context.state:
        blob = context.state[STATE_KEY]["state"]
        # The same tensors and dicts that dpseg's checkpoints hold (weights_only).
        state = torch.load(io.BytesIO(blob), weights_only=True)
    fresh = state is None and (store is None or not store.releases())
    site = _build_site(cfg, data, index, num_classes, _secret(cfg, context, index, fresh))
    if state is not None:
        site.load_state_dict(state)
    if store is not None:  # the state must not be older than the site's own release log
        dp = site.ledger is not None
        store.check_not_behind(
            float(site.epsilon) if dp else None, state is not None,
            steps=site.ledger.steps if dp else None,
        )  # fmt: skip
    elif site.ledger is not None and not _warned_no_store:
        _warned_no_store.append(True)
        log.warning(
            "site %s has no state-dir in its node config: its privacy ledger lives in this "
            "SuperNode's memory only, and a restarted node would begin at epsilon 0. Give "
            "--node-config '... state-dir=\"/path/on/the/hospital/disk\"'",
            site.name,
        )
    return cfg, site, data, num_classes


_warned_no_store: list[bool] = []


def _held(context: Context):
    """The site's state-dir locked for one message (a no-op without one)."""
    store = _store(context)
    return store.lock() if store is not None else contextlib.nullcontext()


def save_site(context: Context, site: Site, release: dict | None = None) -> None:
    """Persists the site's state (and the release about to leave it) before the reply."""
    state = site.state_dict()
    store = _store(context)
    if store is not None:  # the disk is what load_site reads first: no second copy
        store.save(state)
        if release is not None:
            store.record_release({"site": site.name, **release})
        return
    buf = io.BytesIO()
    torch.save(state, buf)
    context.state[STATE_KEY] = ConfigRecord({"state": buf.getvalue()})


def _fault_after_persist(site: str, r: int) -> None:
    """Fault injection for the tests (DPSEG_FAULT_AFTER_PERSIST="site0:2"): the node dies
    after writing round r's release to its disk and before the reply leaves, once (a marker
    beside the state records that it did)."""
    spec = os.environ.get("DPSEG_FAULT_AFTER_PERSIST", "")
    if spec == f"{site}:{r}":
        marker = Path(os.environ.get("DPSEG_FAULT_MARKER", "/nonexistent"))
        if not marker.exists():
            marker.write_text("died")
            os._exit(1)


# --- messages ----------------------------------------------------------------------------
def _query(msg: Message, context: Context) -> Message:
    cfg = load_config(context)
    data, index, num_classes = _site_data(cfg, context)
    q, steps_per_epoch = poisson_rate(len(data.train_images), cfg.batch_size, cfg.sample_rate)
    info = {
        "name": data.name, "index": index, "sample_rate": q, "steps_per_epoch": steps_per_epoch,
        "weight": steps_per_epoch * cfg.batch_size, "noise_multiplier": _sigma(cfg, data),
        "num_classes": num_classes,
    }  # fmt: skip
    if cfg.share_site_stats:
        info.update(train_cases=len(data.train_images), test_cases=len(data.test_images))
    return Message(RecordDict({"site": ConfigRecord(info)}), reply_to=msg)


def _train(msg: Message, context: Context) -> Message:
    with _held(context):
        return _train_held(msg, context)


def _own_check(
    cfg: FederatedConfig, delta: Weights, weights: Weights, scale: float
) -> tuple[str, str] | None:
    """(why, for the server; why, for the site's log) this honest site will not send
    ``delta`` (module docstring), or None. Under SecAgg+ the server's copy names no value
    of the update: the server is not to learn anything of one site's update but the sum."""
    reason = check_update(delta, weights, cfg.max_update_norm)
    if reason is not None:
        if not cfg.secagg:
            return reason, reason
        kind = "not finite" if "non-finite" in reason else "beyond --max-update-norm"
        return f"its update is {kind}; it sent none", reason
    if cfg.secagg:
        peak = max((float(d.abs().max()) for d in delta.values() if d.numel()), default=0.0)
        if peak * scale > cfg.secagg_clip_range:
            why = (
                f"a coordinate of its weighted update is beyond --secagg-clip-range "
                f"{cfg.secagg_clip_range:g}, and SecAgg+ would clip it; raise "
                "--secagg-clip-range"
            )
            return why, f"{why} (it is {peak * scale:.4g})"
    return None


def _train_held(msg: Message, context: Context) -> Message:
    set_threads(context)
    cfg, site, _data, _ = load_site(context)
    template = trainable_state(site.module)
    secure = secagg.is_fitins(msg.content)
    if secure:
        weights, conf = secagg.fitins_weights(msg.content, template)
        scale = site.weight / float(conf["max-weight"])  # x_k = (w_k / W) delta_k
    else:
        weights, conf = msg.content["weights"].to_torch_state_dict(), msg.content["config"]
        scale = 1.0
    fit_config = {k: float(conf[k]) for k in ("proximal_mu", "lr_scale") if k in conf}
    r = int(conf.get("round", 0))
    result: dict = {"status": "ok"}
    delta = None
    try:
        update = site.fit(weights, int(conf["steps"]), fit_config)
    except BudgetExhausted as exc:
        result = {"status": "budget", "message": str(exc)}
    except Exception as exc:  # reported to the server, which leaves the site out of the round
        log.error("site %s failed:\n%s", site.name, traceback.format_exc())
        result = {"status": "failed", "error": f"{type(exc).__name__} (see the site's log)"}
    else:
        result["steps"] = update.steps
        if cfg.share_site_stats:
            result.update(
                num_examples=update.num_examples, seconds=update.seconds,
                cpu_seconds=float(update.metrics.get("cpu_seconds", 0.0)),
            )  # fmt: skip
            if update.loss is not None:
                result["loss"] = update.loss
        refused = _own_check(cfg, update.delta, weights, scale)
        if refused is None:
            delta = update.delta
        else:  # its DP steps are spent (the state below keeps them); nothing is released
            log.error("site %s round %d: not sending its update: %s", site.name, r, refused[1])
            result = {"status": "failed", "error": refused[0], "steps": update.steps}
    release = None
    if delta is not None:
        release = {"round": r, "steps": int(result["steps"])}
        if site.ledger is not None:
            release["epsilon"] = float(site.epsilon)
    save_site(context, site, release)  # on this node's disk before the update leaves it
    if delta is not None:
        _fault_after_persist(site.name, r)
    if secure:  # SecAgg+'s mod masks x_k (zeros when the site sends nothing) after this
        content = secagg.pack_fitres(secagg.weighted_update(delta, template, scale), result)
    else:
        arrays = ArrayRecord(delta) if delta is not None else ArrayRecord()
        content = RecordDict({"delta": arrays, "result": ConfigRecord(result)})
    return Message(content, reply_to=msg)


def _evaluate(msg: Message, context: Context) -> Message:
    with _held(context):
        return _evaluate_held(msg, context)


def _evaluate_held(msg: Message, context: Context) -> Message:
    set_threads(context)
    cfg, site, data, num_classes = load_site(context)
    r = int(msg.content["config"]["round"])
    result: dict = {}
    if site.ledger is not None:
        result["epsilon"] = site.ledger.record_round(r)["epsilon"]
        save_site(context, site)
    model = model_fn(cfg, num_classes)().to(cfg.device)
    model.load_state_dict(msg.content["weights"].to_torch_state_dict(), strict=False)
    start = time.perf_counter()
    scores = evaluate_dice(
        model, [data], cfg.patch, num_classes, cfg.eval_overlap, cfg.device, cfg.spatial_dims
    )
    seconds = time.perf_counter() - start
    dice = scores["sites"][data.name]
    _keep_evaluation(context, site.name, r, scores, dice)
    if cfg.share_site_stats:
        result.update(eval_seconds=seconds, test_cases=len(data.test_images))
        if dice is not None:
            result["dice"] = dice
            result["dice_largest_component"] = scores["sites_largest_component"][data.name]
            cases = list(scores["cases"].values())  # [dice, with the largest component]
            result["case_dice"] = [float(c[0]) for c in cases]
            result["case_dice_largest_component"] = [float(c[1]) for c in cases]
    return Message(RecordDict({"result": ConfigRecord(result)}), reply_to=msg)


def _keep_evaluation(context: Context, site: str, r: int, scores: dict, dice) -> None:
    """The site's own validation of the global model, on its own disk (names included:
    this file never leaves the site)."""
    store = _store(context)
    if store is None:
        log.info("site %s round %d: held-out Dice %s", site, r, dice)
        return
    line = {"round": r, "dice": dice, "cases": scores["cases"], "time": time.time()}
    with (store.folder / EVALUATION_FILE).open("a") as f:
        f.write(json.dumps(line) + "\n")


def make_client_app() -> ClientApp:
    """A ClientApp whose train/evaluate/query run this node's dpseg site; SecAgg+'s stages
    go through Flower's secaggplus_mod when the server runs --secagg."""
    app = ClientApp()
    app.query()(_query)
    app.train(mods=[secagg.secagg_when_asked])(_train)
    app.evaluate()(_evaluate)
    return app
