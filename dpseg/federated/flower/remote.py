"""The server's view of the sites and how it reaches them: ``RemoteSite`` (what the sampler
and the report read of a site), ``discover`` (ask every node who it is, wait for
``num-sites``, order them by site index), ``Nodes`` (which SuperNode serves which site, a
restarted one included) and ``exchange`` (send each site its message, wait for the replies,
resend to a site whose node came back)."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

from flwr.app import Context, Message, MessageType, RecordDict
from flwr.serverapp import Grid

__all__ = ["Nodes", "RemoteSite", "discover", "exchange"]

log = logging.getLogger("dpseg.federated")


@dataclass
class RemoteSite:
    """The server's view of a site: what build_report and the sampler read of a ``Site``.
    Its case counts are known only when the sites share them (--share-site-stats)."""

    name: str
    index: int
    node_id: int
    sample_rate: float
    steps_per_epoch: int
    noise_multiplier: float
    num_classes: int
    weight: int  # B / q: public (strategies.py)
    train_cases: int | None = None
    test_cases: int | None = None
    cases: dict = field(default_factory=dict)  # names: never sent; empty
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
    def train_images(self) -> range | None:
        return None if self.train_cases is None else range(self.train_cases)

    @property
    def test_images(self) -> range | None:
        return None if self.test_cases is None else range(self.test_cases)


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


class Nodes:
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


def exchange(
    grid: Grid,
    nodes: Nodes,
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


def discover(grid: Grid, context: Context) -> list[RemoteSite]:
    rc = context.run_config
    nodes = _wait_for_nodes(grid, int(rc["num-sites"]), float(rc["connect-timeout"]))
    replies = _send(grid, MessageType.QUERY, {n: RecordDict() for n in nodes}, "0", 600.0)
    sites = []
    for node, reply in replies.items():
        if reply.has_error():
            raise RuntimeError(f"SuperNode {node} could not load its site: {reply.error.reason}")
        info = reply.content["site"]
        counts = {k: int(info[k]) for k in ("train_cases", "test_cases") if k in info}
        sites.append(
            RemoteSite(
                str(info["name"]),
                int(info["index"]),
                node,
                float(info["sample_rate"]),
                int(info["steps_per_epoch"]),
                float(info["noise_multiplier"]),
                int(info["num_classes"]),
                int(info["weight"]),
                **counts,
            )  # fmt: skip
        )
    sites.sort(key=lambda s: s.index)
    if len(sites) != len(nodes) or len({s.name for s in sites}) != len(sites):
        raise RuntimeError(f"sites must be distinct, got {[s.name for s in sites]}")
    return sites
