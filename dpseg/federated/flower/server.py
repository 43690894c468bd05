"""The ServerApp: dpseg's strategies over the connected sites, and the same report.json /
report.md as ``dpseg federate``.

It asks every node once who it is (QUERY), waits for ``num-sites`` of them, and orders them
by site index, so that the sampler and the order of aggregation are those of the in-process
simulator. Each round the chosen sites train (TRAIN: global weights and the round's settings
out, each site's update back), the server checks each update and aggregates those it
accepts (update_checks.py, through ``Simulator.aggregate``), and every site scores the new
model and reports its epsilon (EVALUATE). Under --secagg the TRAIN exchange is SecAgg+
(secagg.py): the server gets only the sum, holds it to what honest sites can send, and
takes the server step with it.

Every message goes through ``TrafficGrid`` (traffic.py): each round records the bytes its
training exchange took, and the run config's ``record-traffic`` writes down every message.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Callable
from pathlib import Path

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, MessageType, RecordDict
from flwr.serverapp import Grid, ServerApp

from dpseg.federated.flower import secagg
from dpseg.federated.flower.config import load_config, model_fn
from dpseg.federated.flower.remote import Nodes, RemoteSite, discover, exchange
from dpseg.federated.flower.traffic import TrafficGrid
from dpseg.federated.report import build_report, write_report
from dpseg.federated.runner import (
    FederatedConfig,
    round_line,
    round_lr_schedule,
    run_environment,
    server_strategy,
)
from dpseg.federated.simulator import Simulator
from dpseg.federated.strategies import SiteUpdate
from dpseg.federated.update_checks import check_secure_sum
from dpseg.privacy.secret import new_secret, resumed_secret

__all__ = ["flower_round", "make_server_app", "make_simulator", "server_state_path"]

log = logging.getLogger("dpseg.federated")


def make_simulator(
    cfg: FederatedConfig, sites: list[RemoteSite], num_classes: int, secret: int | None = None
) -> Simulator:
    """A Simulator over the remote sites: its sampler, strategy (with client-level DP),
    update checks, server ledger and history, with the rounds run by ``flower_round``.
    ``secret`` keys the sampling of sites and the client-level noise (the server's own:
    OUT/secret.key, or --secret-seed)."""
    model = model_fn(cfg, num_classes)().to(cfg.device)
    strategy, client_dp = server_strategy(cfg)
    return Simulator(
        sites, model, strategy, local_steps=cfg.local_steps, local_epochs=cfg.local_epochs,
        fraction=cfg.fraction, seed=cfg.seed, secret=secret, client_dp=client_dp,
        label=cfg.engines[0],
        lr_schedule=round_lr_schedule(cfg), max_update_norm=cfg.max_update_norm,
    )  # fmt: skip


# --- one round -----------------------------------------------------------------------------
def _site_result(site: RemoteSite, res, entry: dict) -> bool:
    """Files a site's cleartext TRAIN result into its entry; True if it sent an update. A
    reply the server cannot read fails that site for the round; it never stops the run."""
    try:
        return _read_result(site, res, entry)
    except (KeyError, TypeError, ValueError) as exc:
        entry.update(status="failed", error=f"malformed reply ({type(exc).__name__}: {exc})")
        return False


def _read_result(site: RemoteSite, res, entry: dict) -> bool:
    status = str(res["status"])
    if status == "budget":
        site.exhausted = str(res["message"])
        entry.update(status="budget", message=site.exhausted)
        return False
    if status == "failed":
        entry.update(status="failed", error=str(res["error"]))
        return False
    entry.update(status="ok", steps=int(res["steps"]))
    for key in ("loss", "seconds", "cpu_seconds"):  # only under --share-site-stats
        if key in res:
            entry[key] = float(res[key])
    return True


def _train_plain(sim, grid, nodes, chosen, r, config, timeout, retries, record) -> None:
    contents = {}
    for s in chosen:
        conf = {"round": r, "steps": s.steps_for(sim.local_steps, sim.local_epochs), **config}
        contents[s.name] = RecordDict({"weights": _weights(sim), "config": ConfigRecord(conf)})
    replies, sent = (
        exchange(grid, nodes, MessageType.TRAIN, contents, str(r), timeout, retries)
        if contents
        else ({}, {})
    )
    record["retried"] = {n: k - 1 for n, k in sent.items() if k > 1}
    updates = []
    for site in chosen:
        entry = record["sites"][site.name]
        reply = replies.get(site.name)
        entry["messages"] = sent.get(site.name, 0)
        if reply is None or reply.has_error():
            why = f"no reply in {timeout:.0f} s" if reply is None else reply.error.reason
            entry.update(status="failed", error=why)
            log.error("round %d: site %s dropped out: %s", r, site.name, why)
            continue
        if not _site_result(site, reply.content.get("result", {}), entry):
            continue
        try:
            delta = reply.content["delta"].to_torch_state_dict()
        except (KeyError, AttributeError, TypeError, ValueError) as exc:
            entry.update(status="failed", error=f"malformed update ({type(exc).__name__})")
            continue
        steps = int(entry["steps"])
        updates.append(SiteUpdate(site.name, delta, 0, steps, weight=float(site.weight)))
    sim.aggregate(updates, record)


def _train_secure(sim, grid, context, nodes, chosen, r, config, cfg, timeout, record) -> None:
    """The round's TRAIN exchange as SecAgg+: the sum, checked, then the server step."""
    record["retried"], record["refused"], record["took_part"] = {}, [], []
    if len(chosen) < 3:  # sites out of budget: two left would see each other's update
        record["refused_round"] = (
            f"{len(chosen)} site(s) can train this round: SecAgg+ needs 3 (with 2, each "
            "learns the other's update from the sum); the round is not run"
        )
        for site in chosen:
            record["sites"][site.name].update(status="idle", seconds=0.0)
        log.error("round %d refused: %s", r, record["refused_round"])
        return
    max_weight = max(s.weight for s in sim.sites)
    configs = {
        s.name: {"round": r, "steps": s.steps_for(sim.local_steps, sim.local_epochs),
                 **config, "max-weight": max_weight}
        for s in chosen
    }  # fmt: skip
    res = secagg.secure_round(
        grid, context, r, sim.weights, configs, {s.name: s.node_id for s in chosen},
        clip_range=cfg.secagg_clip_range, bits=cfg.secagg_bits, timeout=timeout,
    )  # fmt: skip
    record["secagg"] = {"summed": res.n, "threshold": secagg.threshold(len(chosen)),
                        "seconds": res.seconds}  # fmt: skip
    if res.halted or res.total is None:  # no site's result reached the server
        for site in chosen:
            record["sites"][site.name].update(status="failed", error="round halted")
        record["refused_round"] = res.halted
        log.error("round %d refused: %s", r, res.halted)
        return
    ok = []
    for site in chosen:
        entry = record["sites"][site.name]
        if site.name not in res.results:
            entry.update(status="failed", error="dropped out during secure aggregation")
            continue
        if _site_result(site, res.results[site.name], entry):
            ok.append(site)
    reason = check_secure_sum(res.total, res.n, cfg.secagg_clip_range, cfg.max_update_norm)
    if reason is not None:  # the sum shows no site: the whole round goes
        record["refused_round"] = reason
        log.error("round %d refused: %s", r, reason)
        return
    if not ok:
        return
    weight_sum = float(sum(s.weight for s in ok))
    record["secagg"]["max_error"] = secagg.max_error(
        res.n, cfg.secagg_clip_range, cfg.secagg_bits, max_weight, weight_sum
    )
    mean = secagg.weighted_mean(res.total, max_weight, weight_sum, sim.weights)
    record["took_part"] = [s.name for s in ok]
    sim.server_step(lambda: sim.strategy.apply(sim.weights, mean), record)


def _weights(sim: Simulator) -> ArrayRecord:
    return ArrayRecord({k: v.contiguous() for k, v in sim.weights.items()})


def _evaluate_round(sim, grid, nodes, r, timeout, retries, record) -> None:
    contents = {
        s.name: RecordDict({"weights": _weights(sim), "config": ConfigRecord({"round": r})})
        for s in sim.sites
    }
    replies, _ = exchange(grid, nodes, MessageType.EVALUATE, contents, str(r), timeout, retries)
    dice, dice_lc, cases = [], [], []
    record["cases"] = {}
    for site in sim.sites:
        entry = record["sites"][site.name]
        reply = replies.get(site.name)
        if reply is None or reply.has_error():
            entry["epsilon"] = site.epsilon
            continue
        res = reply.content["result"]
        if "epsilon" in res and math.isfinite(float(res["epsilon"])):
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
        if "dice" in res:  # only under --share-site-stats
            entry["dice"] = float(res["dice"])
            entry["dice_largest_component"] = float(res["dice_largest_component"])
            dice.append(entry["dice"])
            dice_lc.append(entry["dice_largest_component"])
            cases.append(int(res["test_cases"]))
            for i, (d, d_lc) in enumerate(
                zip(res["case_dice"], res["case_dice_largest_component"], strict=True)
            ):
                record["cases"][f"{site.name}/{i}"] = [float(d), float(d_lc)]
    # Pooled: each held-out case counts once, as evaluate_dice pools them.
    total = sum(cases)
    pooled = sum(d * n for d, n in zip(dice, cases, strict=True))
    pooled_lc = sum(d * n for d, n in zip(dice_lc, cases, strict=True))
    record["pooled_dice"] = pooled / total if total else None
    record["pooled_dice_largest_component"] = pooled_lc / total if total else None


def flower_round(
    sim: Simulator, grid: TrafficGrid, context: Context, nodes: Nodes, cfg: FederatedConfig,
    timeout: float, retries: int, persist: Callable[[], None] | None = None,
) -> dict:  # fmt: skip
    """Simulator.run_round with the sites reached through Flower: the chosen sites train in
    parallel, and their updates are checked and aggregated in site order, as the simulator
    does (or summed by SecAgg+).

    ``persist()`` saves the server's state once the round's model is made and before it
    leaves for the sites' evaluation: a server that dies after that release resumes past
    the round. Resumed before it, it would make round r again with the same (secret, r)
    client-level noise around other site updates, and the two released models' difference
    would show the sum without noise."""
    r = sim.round + 1
    nodes.refresh()  # a site restarted since the last round is reached on its new node
    chosen = sim.sample()
    config = sim.fit_config(r)
    record: dict = {"round": r, "sampled": [s.name for s in chosen], "sites": {}}
    for site in sim.sites:
        entry: dict = {"status": "idle", "seconds": 0.0, "steps": 0}
        record["sites"][site.name] = entry
        if site not in chosen and site.exhausted:
            entry["status"] = "budget"
        elif site in chosen:
            entry["seconds"] = None  # the site's own time: only under --share-site-stats
    start, cpu_start = time.perf_counter(), time.process_time()
    sent, received = grid.totals()
    if cfg.secagg and chosen:
        _train_secure(sim, grid, context, nodes, chosen, r, config, cfg, timeout, record)
    else:
        _train_plain(sim, grid, nodes, chosen, r, config, timeout, retries, record)
    record["aggregate_seconds"] = 0.0  # inside the exchange; "seconds" holds both
    record["seconds"] = time.perf_counter() - start
    sent2, received2 = grid.totals()
    record["train_bytes"] = {"sent": sent2 - sent, "received": received2 - received}
    # The server's CPU time, plus the sites' training CPU time when they share it.
    site_cpu = sum(e.get("cpu_seconds") or 0.0 for e in record["sites"].values())
    record["cpu_seconds"] = site_cpu + time.process_time() - cpu_start
    sim.close_round(record, r)
    sim.round = r
    sim.history.append(record)
    if persist is not None:
        persist()
    eval_start = time.perf_counter()
    _evaluate_round(sim, grid, nodes, r, timeout, retries, record)
    record["eval_seconds"] = time.perf_counter() - eval_start
    return record


# --- the run ---------------------------------------------------------------------------------
def server_state_path(out: Path, engine: str) -> Path:
    return out / f"flower_{engine}_state.pt"


def _server_main(grid: Grid, context: Context) -> None:
    cfg = load_config(context)
    rc = context.run_config
    out = Path(str(rc["out"]))
    out.mkdir(parents=True, exist_ok=True)
    grid = TrafficGrid(grid, record=str(rc.get("record-traffic", "")) or None)
    sites = discover(grid, context)
    cfg.check_secagg(len(sites))
    nodes = Nodes(grid, sites)
    num_classes = sites[0].num_classes
    resume = bool(rc.get("resume", False))
    secret = (resumed_secret if resume else new_secret)(out, cfg.secret_seed)
    sim = make_simulator(cfg, sites, num_classes, secret)
    sigmas = {s.name: s.noise_multiplier for s in sites}
    env = {**run_environment(cfg.device), "runtime": "flower", "flwr": _flwr_version()}
    engine = cfg.engines[0]
    state_path = server_state_path(out, engine)
    if resume:
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
        record = flower_round(
            sim, grid, context, nodes, cfg, timeout, retries,
            persist=lambda: sim.save(state_path, extra={"config": cfg.resume_key()}),
        )  # fmt: skip
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
