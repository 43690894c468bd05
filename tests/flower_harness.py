"""Flower without processes, and what the tests read of a run's recorded traffic.

Flower without processes: a Grid that hands each message to the ClientApp of its node in
this process, each node with its own Context as a SuperNode keeps one. The ServerApp's round
code, dpseg's ClientApp and Flower's SecAgg+ (mod and workflow) run as deployed; only the
transport is replaced, and the contents are copied both ways as the wire would. A round of
three tiny sites takes seconds, where the loopback deployment (tests/test_flower*.py, slow)
takes minutes.

A node can be made to crash after handling a message (``crash``: the ClientApp runs, so the
site persists its release, and the reply is lost, as DPSEG_FAULT_AFTER_PERSIST does on
loopback), and a site's train handler can be wrapped in extra mods (``train_mods``: a hostile
site, inside SecAgg+'s mod so that what it sends is masked like an honest site's).
"""

from __future__ import annotations

import copy
import itertools
import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Context,
    Error,
    Message,
    MetricRecord,
    RecordDict,
)
from flwr.clientapp import ClientApp
from flwr.common import bytes_to_ndarray
from flwr.serverapp import Grid
from flwr.supercore.task_identity import TaskIdentity

from dpseg.federated.flower import client as fclient
from dpseg.federated.flower import secagg
from dpseg.federated.flower import server as fserver
from dpseg.federated.flower.config import run_config_for
from dpseg.federated.flower.remote import Nodes, discover
from dpseg.federated.flower.traffic import TrafficGrid
from dpseg.federated.runner import FederatedConfig, load_data

RUN_ID = 7


def _copy(content: RecordDict) -> RecordDict:
    """A copy sharing nothing with ``content``, as a message off the wire."""
    out = RecordDict()
    for name, rec in content.array_records.items():
        arrays = {k: Array(a.dtype, tuple(a.shape), a.stype, bytes(a.data)) for k, a in rec.items()}
        out.array_records[name] = ArrayRecord(arrays)
    for name, rec in content.config_records.items():
        out.config_records[name] = ConfigRecord(copy.deepcopy(dict(rec)))
    for name, rec in content.metric_records.items():
        out.metric_records[name] = MetricRecord(copy.deepcopy(dict(rec)))
    return out


class _Run:
    run_id = RUN_ID


def client_app(train_mods: list | None = None) -> ClientApp:
    """dpseg's ClientApp, with ``train_mods`` inside SecAgg+'s mod (closest to the site)."""
    app = ClientApp()
    app.query()(fclient._query)
    app.train(mods=[secagg.secagg_when_asked, *(train_mods or [])])(fclient._train)
    app.evaluate()(fclient._evaluate)
    return app


class InProcessGrid(Grid):
    def __init__(self, apps: dict[int, ClientApp], contexts: dict[int, Context]):
        self.apps, self.contexts = apps, contexts
        self.crash: dict[int, Callable[[Message], bool]] = {}  # node -> crash after this msg?
        self.pending: dict[str, Message] = {}
        self.ids = itertools.count(1)

    def set_run(self, run) -> None:
        pass

    @property
    def run(self):
        return _Run()

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None) -> Message:
        return Message(content, dst_node_id, message_type, group_id=group_id, ttl=ttl)

    def get_node_ids(self):
        return list(self.apps)

    def push_messages(self, messages):
        ids = []
        for msg in messages:
            mid = f"m{next(self.ids)}"
            msg.metadata.__dict__["_message_id"] = mid
            self.pending[mid] = msg
            ids.append(mid)
        return ids

    def _deliver(self, msg: Message) -> Message:
        node = msg.metadata.dst_node_id
        inbound = Message(_copy(msg.content), node, msg.metadata.message_type,
                          group_id=msg.metadata.group_id)  # fmt: skip
        inbound.metadata.__dict__["_message_id"] = msg.metadata.message_id
        try:
            reply = self.apps[node](inbound, self.contexts[node])
        except Exception as exc:  # a ClientApp exception travels as an error reply
            return Message(Error(code=0, reason=f"{type(exc).__name__}: {exc}"), reply_to=msg)
        if self.crash.get(node, lambda m: False)(msg):
            return Message(Error(code=0, reason="the node died"), reply_to=msg)
        if reply.has_error():
            return Message(reply.error, reply_to=msg)
        return Message(_copy(reply.content), reply_to=msg)

    def pull_messages(self, message_ids):
        out = []
        for mid in list(message_ids):
            msg = self.pending.pop(mid, None)
            if msg is not None:
                out.append(self._deliver(msg))
        return out

    def send_and_receive(self, messages, *, timeout=None):
        return self.pull_messages(self.push_messages(messages))


class Federation:
    """A dpseg run's server side over in-process sites: ``round()`` is the ServerApp's."""

    def __init__(
        self, cfg: FederatedConfig, out: Path, train_mods: dict[int, list] | None = None,
        record: Path | None = None,
    ):  # fmt: skip
        TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = RUN_ID, 0, 1
        self.cfg, self.out = cfg, Path(out)
        sites, self.num_classes = load_data(cfg, self.out, progress=False)
        self.names = [s.name for s in sites]
        self.run_config = run_config_for(cfg, self.out, len(sites))
        self.node_ids = [1000 + k for k in range(len(sites))]
        contexts, apps = {}, {}
        for k, node in enumerate(self.node_ids):
            state_dir = self.out / f"node{k}" / "site-state"
            contexts[node] = Context(
                run_id=RUN_ID, node_id=node, state=RecordDict(), run_config=self.run_config,
                node_config={"site-index": k, "site": self.names[k], "state-dir": str(state_dir)},
            )  # fmt: skip
            apps[node] = client_app((train_mods or {}).get(k))
        self.inner = InProcessGrid(apps, contexts)
        self.grid = TrafficGrid(self.inner, record=record)
        self.context = Context(run_id=RUN_ID, node_id=0, node_config={}, state=RecordDict(),
                               run_config=self.run_config)  # fmt: skip
        self.sites = discover(self.grid, self.context)
        self.nodes = Nodes(self.grid, self.sites)
        self.sim = fserver.make_simulator(cfg, self.sites, self.num_classes)

    def node(self, site: str) -> int:
        return self.node_ids[self.names.index(site)]

    def state_dir(self, site: str) -> Path:
        return self.out / f"node{self.names.index(site)}" / "site-state"

    def round(self, timeout: float = 30.0) -> dict:
        return fserver.flower_round(
            self.sim, self.grid, self.context, self.nodes, self.cfg, timeout, 0
        )


# --- what the server received (traffic.py's record) -------------------------------------------
# Figures computed from a site's patients without DP noise, as keys of the records a site sends.
UNNOISED = {"loss", "dice", "dice_largest_component", "case_dice", "case_dice_largest_component",
            "case_names", "train_cases", "test_cases", "num_examples", "seconds", "cpu_seconds",
            "eval_seconds", "cases"}  # fmt: skip


def received(traffic: Path, kind: str | None = None):
    """(line, arrays) of every message the server received, as traffic.py wrote them."""
    for line in (traffic / "traffic.jsonl").read_text().splitlines():
        msg = json.loads(line)
        if msg["direction"] != "in" or (kind is not None and msg["type"] != kind):
            continue
        npz = traffic / f"{msg['seq']:05d}.npz"
        arrays = dict(np.load(npz)) if npz.exists() else {}
        yield msg, arrays


def case_names(cfg: FederatedConfig, out: Path) -> list[str]:
    sites, _ = load_data(cfg, out, progress=False)
    return [n for s in sites for split in s.cases.values() for n in split]


def sent_keys(traffic: Path) -> set[str]:
    keys = set()
    for msg, _ in received(traffic):
        for name, record in msg["records"].items():
            if name == "fitres.num_examples":  # SecAgg+'s weight slot: 1 for every site
                assert record == {"num_examples": 1}
                continue
            keys |= set(record)
    return keys


def assert_only_masked(traffic: Path, names: dict[int, str], deltas: dict, weights: dict,
                       clip: float, bits: int, round: str | None = None) -> int:  # fmt: skip
    """Holds everything the server received to SecAgg+'s promise: no float array anywhere,
    and each site's masked vector agreeing with its quantised update (x + C) 2^B / 2C,
    x = (w_k / W) delta_k, to a step about as often as chance (3 in 2^32), not everywhere.
    ``round``: compare only that round's masked vectors (``deltas`` are its updates).
    Returns the number of masked vectors compared."""
    top = max(weights.values())
    masked = 0
    for msg, arrays in received(traffic):
        assert not any(a.dtype.kind == "f" for a in arrays.values()), msg["records"].keys()
        vectors = [v for k, v in arrays.items() if "|masked_params|" in k]
        if not vectors or (round is not None and msg["round"] != round):
            continue
        masked += 1
        site = names[msg["node"]]
        ints = [bytes_to_ndarray(v.tobytes()) for v in vectors]
        assert all(a.dtype.kind in "iu" for a in ints)
        assert max(int(a.max()) for a in ints) > 2**31  # masked: spread over all of Z_2^32
        agree = count = 0
        for k, m in zip(deltas[site], ints[1:], strict=True):  # ints[0]: the weight slot
            x = deltas[site][k].double().numpy() * weights[site] / top
            q = (x + clip) * 2**bits / (2 * clip)
            agree += int((np.abs(m.astype(np.float64) - q) <= 1).sum())
            count += q.size
        assert agree <= 0.001 * count, (site, agree, count)
    return masked


# --- how close SecAgg+'s model is to the plain one -----------------------------------------
def _slack(mean: np.ndarray, new: np.ndarray, n: int) -> np.ndarray:
    """float32 rounding on top of the quantisation bound, per coordinate: the plain mean's n
    weighted additions and the secure mean's cast (half a spacing of |mean| each), and both
    models' w + mean (half a spacing of the result each)."""
    top = np.float32(np.abs(mean).max())
    return (n + 1) * np.spacing(top) + np.spacing(np.abs(new).astype(np.float32))


def assert_within_bound(got, w0, deltas, weights, n_summed, bound):
    """Every coordinate of the model ``got`` is FedAvg's w0 + sum_k (w_k / sum w) delta_k
    to within the quantisation ``bound`` and float32 rounding."""
    total = float(sum(weights[s] for s in deltas))
    for k in w0:
        mean = sum(weights[s] / total * deltas[s][k].double() for s in deltas).numpy()
        want = w0[k].double().numpy() + mean
        diff = np.abs(got[k].double().numpy() - want)
        assert (diff <= bound + _slack(mean, want, n_summed)).all(), (k, diff.max(), bound)


def site_names(traffic: Path) -> dict[int, str]:
    """{node id: site} from the QUERY replies the server received."""
    return {m["node"]: m["records"]["site"]["name"] for m, _ in received(traffic, "query")}
