"""dpseg's federation on Flower: a ClientApp that runs one dpseg ``Site`` and a ServerApp that
runs dpseg's strategies and writes the same report.json/report.md as ``dpseg federate``.

The apps talk with Flower's Message API (flwr >= 1.10; written against 1.42):

- ``query``: the site says who it is (name, index, cases, q, sigma). The server asks every
  node once, waits for ``num-sites`` of them, and orders them by site index, so that the
  sampler and the order of aggregation are those of the in-process simulator.
- ``train``: global weights (ArrayRecord "weights") and the round's settings (ConfigRecord
  "config": round, local steps, FedProx mu) in; the weight change (ArrayRecord "delta") and
  the round's status, loss and timings (ConfigRecord "result") out.
- ``evaluate``: the new global weights in; the site's held-out Dice and its epsilon after
  the round out. It goes to every site each round, trained or not, as the simulator records
  every site's ledger every round.

Flower rebuilds the ClientApp for every message (with SuperNode isolation, in a fresh
process), so a site keeps everything that must survive a round (optimizer moments, DP step
counter, accountant history, sampler and patch RNGs: ``Site.state_dict()``) in the node's
``Context.state``, a record that Flower keeps on that node and never sends anywhere. The
accountant therefore composes over rounds as in the simulator, and with the same seed the
two runtimes train bit-identical models (tests/test_flower.py).

The run configuration carries the whole ``FederatedConfig`` as one JSON string
(``dpseg-config``) plus ``out`` (the server's run folder), ``num-sites``, ``plots`` and
``threads``. Each node's own configuration (``flower-supernode --node-config``) says which
site it is and where its patients are: ``site-index`` (and optionally ``site``, its name)
and ``data`` (an MSD folder holding this site's cases; without it the node reads the
phantoms the launcher wrote into ``out``).
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import time
import traceback
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

from dpseg.federated.report import build_report, write_report
from dpseg.federated.runner import (
    FederatedConfig,
    load_data,
    round_line,
    round_lr_schedule,
    run_environment,
    server_strategy,
)
from dpseg.federated.simulator import Simulator
from dpseg.federated.site import BudgetExhausted, Site, poisson_rate
from dpseg.federated.site_store import SiteStore
from dpseg.federated.sitedata import SiteData, evaluate_dice

__all__ = ["client_app", "make_client_app", "make_server_app", "run_config_for", "server_app"]

log = logging.getLogger("dpseg.federated")
STATE_KEY = "dpseg-site"  # the record in Context.state that holds Site.state_dict()


# --- run configuration -------------------------------------------------------------------
def run_config_for(
    cfg: FederatedConfig, out: str | Path, num_sites: int, *, plots: bool = True, threads: int = 0
) -> dict:
    """The Flower run config of a dpseg run (flat scalars, as Flower requires)."""
    unsupported = [flag for flag, on in (("--train-sites", bool(cfg.train_sites)),
                                         ("--eval-every", cfg.eval_every != 1)) if on]  # fmt: skip
    if unsupported:
        raise ValueError(
            f"{', '.join(unsupported)}: not carried out on --runtime flower (every site trains "
            "and is evaluated each round there); use the simulator"
        )
    return {
        "dpseg-config": json.dumps(asdict(cfg)),
        "out": str(Path(out).resolve()),
        "num-sites": int(num_sites),
        "plots": bool(plots),
        "threads": int(threads),
        "connect-timeout": 120.0,
        # How long the server waits for a round's replies before it counts a site as
        # dropped out; a site whose node restarts meanwhile is asked again (retries times).
        "round-timeout": 3600.0,
        "retries": 2,
        "resume": False,
    }


def _config(context: Context) -> FederatedConfig:
    return FederatedConfig.from_dict(json.loads(str(context.run_config["dpseg-config"])))


def _threads(context: Context) -> None:
    n = int(context.run_config.get("threads", 0))
    if n > 0:
        torch.set_num_threads(n)


# --- client --------------------------------------------------------------------------------
def _model_fn(cfg: FederatedConfig, num_classes: int):
    from dpseg.models import UNet

    def model_fn():
        return UNet(
            cfg.spatial_dims, 1, num_classes, channels=cfg.channels, norm=cfg.norm,
            upsample=cfg.upsample, seed=cfg.seed,
        )  # fmt: skip

    return model_fn


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


def _build_site(cfg: FederatedConfig, data: SiteData, index: int, num_classes: int) -> Site:
    """The site exactly as runner.build_simulator builds site ``index`` (same seeds)."""
    from dpseg.federated.runner import site_config, site_patches

    return Site(
        data.name, index, site_patches(cfg, data, index), _model_fn(cfg, num_classes),
        site_config(cfg, cfg.engines[0]), noise_multiplier=_sigma(cfg, data), seed=cfg.seed,
    )  # fmt: skip


def _store(context: Context) -> SiteStore | None:
    """The site's own disk (node config ``state-dir``), where its privacy state outlives
    the SuperNode; without it the state lives in Context.state only, and a restarted node
    would begin its ledger at zero."""
    folder = context.node_config.get("state-dir")
    return SiteStore(str(folder)) if folder else None


def _load_site(context: Context) -> tuple[FederatedConfig, Site, SiteData, int]:
    cfg = _config(context)
    data, index, num_classes = _site_data(cfg, context)
    site = _build_site(cfg, data, index, num_classes)
    store = _store(context)
    state = store.load() if store is not None else None  # the disk first: it is what survives
    if state is None and STATE_KEY in context.state:
        blob = context.state[STATE_KEY]["state"]
        # The same tensors, dicts and RNG states that dpseg's checkpoints hold (weights_only).
        state = torch.load(io.BytesIO(blob), weights_only=True)
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


def _save_site(context: Context, site: Site, release: dict | None = None) -> None:
    """Persists the site's state (and the release about to leave it) before the reply."""
    state = site.state_dict()
    store = _store(context)
    if store is not None:  # the disk is what _load_site reads first: no second copy
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


def _query(msg: Message, context: Context) -> Message:
    cfg = _config(context)
    data, index, num_classes = _site_data(cfg, context)
    q, steps_per_epoch = poisson_rate(len(data.train_images), cfg.batch_size, cfg.sample_rate)
    info = {
        "name": data.name, "index": index, "train_cases": len(data.train_images),
        "test_cases": len(data.test_images), "cases": json.dumps(data.cases),
        "sample_rate": q, "steps_per_epoch": steps_per_epoch,
        "noise_multiplier": _sigma(cfg, data),
        "num_classes": num_classes,
    }  # fmt: skip
    return Message(RecordDict({"site": ConfigRecord(info)}), reply_to=msg)


def _train(msg: Message, context: Context) -> Message:
    with _held(context):
        return _train_held(msg, context)


def _train_held(msg: Message, context: Context) -> Message:
    _threads(context)
    _cfg, site, _data, _ = _load_site(context)
    weights = msg.content["weights"].to_torch_state_dict()
    conf = msg.content["config"]
    fit_config = {k: float(conf[k]) for k in ("proximal_mu", "lr_scale") if k in conf}
    result: dict = {"status": "ok"}
    delta = ArrayRecord()
    try:
        update = site.fit(weights, int(conf["steps"]), fit_config)
    except BudgetExhausted as exc:
        result = {"status": "budget", "message": str(exc)}
    except Exception as exc:  # reported to the server, which leaves the site out of the round
        log.error("site %s failed:\n%s", site.name, traceback.format_exc())
        result = {"status": "failed", "error": f"{type(exc).__name__}: {exc}"}
    else:
        delta = ArrayRecord(update.delta)
        result.update(
            num_examples=update.num_examples, steps=update.steps, seconds=update.seconds,
            cpu_seconds=float(update.metrics.get("cpu_seconds", 0.0)),
        )  # fmt: skip
        if update.loss is not None:
            result["loss"] = update.loss
    released = result["status"] == "ok"
    release = None
    if released:
        release = {"round": int(conf.get("round", 0)), "steps": int(result["steps"])}
        if site.ledger is not None:
            release["epsilon"] = float(site.epsilon)
    _save_site(context, site, release)  # on this node's disk before the update leaves it
    if released:
        _fault_after_persist(site.name, int(conf.get("round", 0)))
    content = RecordDict({"delta": delta, "result": ConfigRecord(result)})
    return Message(content, reply_to=msg)


def _evaluate(msg: Message, context: Context) -> Message:
    with _held(context):
        return _evaluate_held(msg, context)


def _evaluate_held(msg: Message, context: Context) -> Message:
    _threads(context)
    cfg, site, data, num_classes = _load_site(context)
    r = int(msg.content["config"]["round"])
    result: dict = {}
    if site.ledger is not None:
        result["epsilon"] = site.ledger.record_round(r)["epsilon"]
        _save_site(context, site)
    model = _model_fn(cfg, num_classes)().to(cfg.device)
    model.load_state_dict(msg.content["weights"].to_torch_state_dict(), strict=False)
    start = time.perf_counter()
    scores = evaluate_dice(
        model, [data], cfg.patch, num_classes, cfg.eval_overlap, cfg.device, cfg.spatial_dims
    )
    result["eval_seconds"] = time.perf_counter() - start
    result["test_cases"] = len(data.test_images)
    if scores["sites"][data.name] is not None:
        result["dice"] = scores["sites"][data.name]
        result["dice_largest_component"] = scores["sites_largest_component"][data.name]
        names = list(scores["cases"])  # per held-out case: [dice, with the largest component]
        result["case_names"] = names
        result["case_dice"] = [float(scores["cases"][n][0]) for n in names]
        result["case_dice_largest_component"] = [float(scores["cases"][n][1]) for n in names]
    return Message(RecordDict({"result": ConfigRecord(result)}), reply_to=msg)


def make_client_app() -> ClientApp:
    """A ClientApp whose train/evaluate/query run this node's dpseg site."""
    app = ClientApp()
    app.query()(_query)
    app.train()(_train)
    app.evaluate()(_evaluate)
    return app


# --- server --------------------------------------------------------------------------------
@dataclass
class RemoteSite:
    """The server's view of a site: what build_report and the sampler read of a ``Site``."""

    name: str
    index: int
    node_id: int
    train_cases: int
    test_cases: int
    sample_rate: float
    steps_per_epoch: int
    noise_multiplier: float
    num_classes: int
    cases: dict = field(default_factory=dict)
    epsilon: float | None = None
    exhausted: str | None = None

    def steps_for(self, local_steps: int | None, local_epochs: int | None) -> int:
        return local_epochs * self.steps_per_epoch if local_epochs is not None else local_steps

    def state_dict(self) -> dict:  # the server's record of the site, for its checkpoint
        return {"epsilon": self.epsilon, "exhausted": self.exhausted}

    def load_state_dict(self, state: dict) -> None:
        self.epsilon, self.exhausted = state["epsilon"], state["exhausted"]

    # build_report reads len() of a SiteData's case lists; these stand in for them.
    @property
    def train_images(self) -> range:
        return range(self.train_cases)

    @property
    def test_images(self) -> range:
        return range(self.test_cases)


def _wait_for_nodes(grid: Grid, n: int, timeout: float) -> list[int]:
    deadline = time.monotonic() + timeout
    while True:
        nodes = sorted(grid.get_node_ids())
        if len(nodes) >= n:
            return nodes
        if time.monotonic() > deadline:
            raise TimeoutError(f"{len(nodes)} of {n} SuperNodes connected within {timeout:.0f} s")
        time.sleep(0.5)


def _send(grid: Grid, kind: str, contents: dict[int, RecordDict], group: str, timeout: float):
    messages = [
        Message(content, dst_node_id=node, message_type=kind, group_id=group)
        for node, content in contents.items()
    ]
    replies = list(grid.send_and_receive(messages, timeout=timeout))
    return {reply.metadata.src_node_id: reply for reply in replies}


class _Nodes:
    """Which SuperNode serves which site. A restarted SuperNode registers under a new node
    id; ``refresh`` asks every node it has not seen which site it is, and moves the site to
    it."""

    def __init__(self, grid: Grid, sites: list[RemoteSite]):
        self.grid, self.sites = grid, {s.name: s for s in sites}
        self.seen = {s.node_id for s in sites}

    def refresh(self) -> set[str]:
        new = [n for n in self.grid.get_node_ids() if n not in self.seen]
        if not new:
            return set()
        moved = set()
        for node, reply in _send(self.grid, MessageType.QUERY,
                                 {n: RecordDict() for n in new}, "0", 120.0).items():  # fmt: skip
            if reply.has_error():
                continue
            name = str(reply.content["site"]["name"])
            if name in self.sites:
                log.warning("site %s is back as SuperNode %d", name, node)
                self.sites[name].node_id = node
                moved.add(name)
        self.seen.update(new)
        return moved


def _exchange(
    grid: Grid,
    nodes: _Nodes,
    kind: str,
    contents: dict[str, RecordDict],
    group: str,
    timeout: float,
    retries: int,
) -> tuple[dict[str, Message], dict[str, int]]:
    """Sends each site its message and waits, at most ``timeout`` seconds, for the replies.
    A site whose SuperNode comes back under a new id while its reply is awaited (it died
    and restarted) is sent the message again, up to ``retries`` times: it trains again,
    and its ledger counts both releases. Returns ({site: reply}, {site: messages sent})."""
    pending: dict[str, str] = {}  # message id -> site
    waiting: dict[str, Message] = {}  # site -> its error reply, while a new node may come

    def push(name: str) -> None:
        msg = Message(contents[name], dst_node_id=nodes.sites[name].node_id,
                      message_type=kind, group_id=group)  # fmt: skip
        pending[next(iter(grid.push_messages([msg])))] = name
        sent[name] += 1

    sent = dict.fromkeys(contents, 0)
    for name in contents:
        push(name)
    replies: dict[str, Message] = {}
    deadline, next_look = time.monotonic() + timeout, time.monotonic() + 2.0
    while (pending or waiting) and time.monotonic() < deadline:
        for reply in grid.pull_messages(list(pending)):
            name = pending.pop(reply.metadata.reply_to_message_id, None)
            if name is None:
                continue
            if reply.has_error():
                waiting[name] = reply  # the node may be gone; a restarted one can answer
            else:
                replies[name] = reply
        if time.monotonic() >= next_look:
            awaited = set(pending.values()) | set(waiting)
            for name in nodes.refresh() & awaited:
                if sent[name] > retries:
                    continue
                pending = {m: n for m, n in pending.items() if n != name}
                waiting.pop(name, None)
                push(name)
            next_look = time.monotonic() + 2.0
        time.sleep(0.2)
    replies.update(waiting)  # errors that no restarted node replaced
    return replies, sent


def _discover(grid: Grid, context: Context) -> list[RemoteSite]:
    rc = context.run_config
    nodes = _wait_for_nodes(grid, int(rc["num-sites"]), float(rc["connect-timeout"]))
    replies = _send(grid, MessageType.QUERY, {n: RecordDict() for n in nodes}, "0", 600.0)
    sites = []
    for node, reply in replies.items():
        if reply.has_error():
            raise RuntimeError(f"SuperNode {node} could not load its site: {reply.error.reason}")
        info = reply.content["site"]
        sites.append(
            RemoteSite(
                str(info["name"]),
                int(info["index"]),
                node,
                int(info["train_cases"]),
                int(info["test_cases"]),
                float(info["sample_rate"]),
                int(info["steps_per_epoch"]),
                float(info["noise_multiplier"]),
                int(info["num_classes"]),
                json.loads(str(info["cases"])),
            )  # fmt: skip
        )
    sites.sort(key=lambda s: s.index)
    if len(sites) != len(nodes) or len({s.name for s in sites}) != len(sites):
        raise RuntimeError(f"sites must be distinct, got {[s.name for s in sites]}")
    return sites


def _simulator(cfg: FederatedConfig, sites: list[RemoteSite], num_classes: int) -> Simulator:
    """A Simulator over the remote sites: its sampler, strategy (with client-level DP),
    server ledger and history, with the rounds run by ``_flower_round`` instead."""
    model = _model_fn(cfg, num_classes)().to(cfg.device)
    strategy, client_dp = server_strategy(cfg)
    return Simulator(
        sites, model, strategy, local_steps=cfg.local_steps, local_epochs=cfg.local_epochs,
        fraction=cfg.fraction, seed=cfg.seed, client_dp=client_dp, label=cfg.engines[0],
        lr_schedule=round_lr_schedule(cfg),
    )  # fmt: skip


def _flower_round(sim: Simulator, grid: Grid, nodes: _Nodes, timeout: float, retries: int) -> dict:
    """Simulator.run_round with the sites reached through Flower: the chosen sites train in
    parallel, and their updates are aggregated in site order, as the simulator does."""
    from dpseg.federated.strategies import SiteUpdate

    r = sim.round + 1
    nodes.refresh()  # a site restarted since the last round is reached on its new node
    chosen = sim.sample()
    config = sim.fit_config(r)
    record: dict = {"round": r, "sampled": [s.name for s in chosen], "sites": {}}
    start, cpu_start = time.perf_counter(), time.process_time()
    weights = ArrayRecord({k: v.contiguous() for k, v in sim.weights.items()})
    contents = {}
    for s in chosen:
        conf = {"round": r, "steps": s.steps_for(sim.local_steps, sim.local_epochs), **config}
        contents[s.name] = RecordDict({"weights": weights, "config": ConfigRecord(conf)})
    replies, sent = (
        _exchange(grid, nodes, MessageType.TRAIN, contents, str(r), timeout, retries)
        if contents
        else ({}, {})
    )
    record["retried"] = {n: k - 1 for n, k in sent.items() if k > 1}
    updates, site_cpu = [], 0.0
    for site in sim.sites:
        entry: dict = {"status": "idle", "seconds": 0.0, "steps": 0}
        record["sites"][site.name] = entry
        if site not in chosen:
            if site.exhausted:
                entry["status"] = "budget"
            continue
        reply = replies.get(site.name)
        entry["messages"] = sent.get(site.name, 0)
        if reply is None or reply.has_error():
            why = f"no reply in {timeout:.0f} s" if reply is None else reply.error.reason
            entry.update(status="failed", error=why)
            log.error("round %d: site %s dropped out: %s", r, site.name, why)
            continue
        res = reply.content["result"]
        if res["status"] == "budget":
            site.exhausted = str(res["message"])
            entry.update(status="budget", message=site.exhausted)
            continue
        if res["status"] == "failed":
            entry.update(status="failed", error=str(res["error"]))
            continue
        loss = float(res["loss"]) if "loss" in res else None
        entry.update(
            status="ok", seconds=float(res["seconds"]), steps=int(res["steps"]), loss=loss,
            cpu_seconds=float(res["cpu_seconds"]),
        )  # fmt: skip
        site_cpu += float(res["cpu_seconds"])
        delta = reply.content["delta"].to_torch_state_dict()
        updates.append(SiteUpdate(site.name, delta, int(res["num_examples"]), int(res["steps"])))
    record["took_part"] = [u.site for u in updates]  # the sites whose update was averaged
    agg_start = time.perf_counter()
    if updates or sim.server_ledger is not None:
        sim.weights = sim.strategy.aggregate(sim.weights, updates)
    record["aggregate_seconds"] = time.perf_counter() - agg_start
    record["seconds"] = time.perf_counter() - start
    # The sites' training CPU time plus the server's: what the simulator's process time counts.
    record["cpu_seconds"] = site_cpu + time.process_time() - cpu_start
    sim.close_round(record, r)
    eval_start = time.perf_counter()
    weights = ArrayRecord({k: v.contiguous() for k, v in sim.weights.items()})
    contents = {
        s.name: RecordDict({"weights": weights, "config": ConfigRecord({"round": r})})
        for s in sim.sites
    }
    replies, _ = _exchange(grid, nodes, MessageType.EVALUATE, contents, str(r), timeout, retries)
    dice, dice_lc, cases = [], [], []
    record["cases"] = {}
    for site in sim.sites:
        entry = record["sites"][site.name]
        reply = replies.get(site.name)
        if reply is None or reply.has_error():
            entry["epsilon"] = site.epsilon
            continue
        res = reply.content["result"]
        if "epsilon" in res:
            reported = float(res["epsilon"])
            if site.epsilon is not None and reported < site.epsilon * (1 - 1e-9):
                # A node whose ledger went back (no state-dir, or its state lost): the
                # report keeps the most the site is known to have spent, and says so.
                log.error("round %d: site %s reports epsilon %.4g below its %.4g",
                          r, site.name, reported, site.epsilon)  # fmt: skip
                entry["epsilon_went_back"] = reported
            else:
                site.epsilon = reported
        entry["epsilon"] = site.epsilon
        if "dice" in res:
            entry["dice"] = float(res["dice"])
            entry["dice_largest_component"] = float(res["dice_largest_component"])
            dice.append(entry["dice"])
            dice_lc.append(entry["dice_largest_component"])
            cases.append(int(res["test_cases"]))
            for name, d, d_lc in zip(
                res["case_names"], res["case_dice"], res["case_dice_largest_component"],
                strict=True,
            ):  # fmt: skip
                # Hospitals name their cases on their own: the same name twice keeps both.
                key = name if name not in record["cases"] else f"{site.name}/{name}"
                record["cases"][key] = [float(d), float(d_lc)]
    # Pooled: each held-out case counts once, as evaluate_dice pools them.
    total = sum(cases)
    pooled = sum(d * n for d, n in zip(dice, cases, strict=True))
    pooled_lc = sum(d * n for d, n in zip(dice_lc, cases, strict=True))
    record["pooled_dice"] = pooled / total if total else None
    record["pooled_dice_largest_component"] = pooled_lc / total if total else None
    record["eval_seconds"] = time.perf_counter() - eval_start
    sim.round = r
    sim.history.append(record)
    return record


def server_state_path(out: Path, engine: str) -> Path:
    return out / f"flower_{engine}_state.pt"


def _server_main(grid: Grid, context: Context) -> None:
    cfg = _config(context)
    rc = context.run_config
    out = Path(str(rc["out"]))
    out.mkdir(parents=True, exist_ok=True)
    sites = _discover(grid, context)
    nodes = _Nodes(grid, sites)
    num_classes = sites[0].num_classes
    sim = _simulator(cfg, sites, num_classes)
    sigmas = {s.name: s.noise_multiplier for s in sites}
    env = {**run_environment(cfg.device), "runtime": "flower", "flwr": _flwr_version()}
    engine = cfg.engines[0]
    state_path = server_state_path(out, engine)
    if bool(rc.get("resume", False)):
        # The server's half of a resumed run; each site brings its own from its disk.
        sim.load(state_path)
        print(f"{engine}: resumed after round {sim.round} from {state_path.name}", flush=True)

    def report() -> dict:
        return build_report(cfg, {engine: sim}, sites, sigmas, env)

    def save(name: str, state: dict) -> None:
        # Renamed into place: a kill leaves the previous file or the new one, never a torn one.
        tmp = out / f".{name}.tmp"
        torch.save(state, tmp)
        os.replace(tmp, out / name)

    timeout = float(rc["round-timeout"])
    retries = int(rc.get("retries", 2))
    pause = out / "flower" / "PAUSE"
    while sim.round < cfg.rounds:
        if sim.done:
            print(f"{engine}: every site has spent its privacy budget; stopping", flush=True)
            break
        record = _flower_round(sim, grid, nodes, timeout, retries)
        print(round_line(engine, record, cfg.rounds), flush=True)
        (out / "report.json").write_text(json.dumps(report(), indent=1))
        # The whole server side of the finished round (global model, strategy moments,
        # sampler, history, server ledger): --resume continues from here.
        sim.save(state_path, extra={"config": cfg.resume_key()})
        save(f"flower_{engine}_latest.pt", {"weights": sim.weights, "round": sim.round})
        if pause.exists():  # an operator's (or a test's) stop between rounds
            print(f"paused after round {sim.round}: remove {pause} to go on", flush=True)
            while pause.exists():
                time.sleep(0.5)
    final = report()
    write_report(final, out, plots=bool(rc["plots"]))
    save(f"flower_{engine}.pt", {"weights": sim.weights, "round": sim.round})  # last: "done"
    print(f"wrote {out / 'report.json'} and {out / 'report.md'}", flush=True)


def _flwr_version() -> str:
    import flwr

    return flwr.__version__


def make_server_app() -> ServerApp:
    """A ServerApp that runs dpseg's strategy over the connected sites and writes the report."""
    app = ServerApp()
    app.main()(_server_main)
    return app


client_app = make_client_app()
server_app = make_server_app()
