"""What the coordinator sends and receives, counted and (on request) written down.

``TrafficGrid`` wraps the ServerApp's Grid: every message pushed to a site and every reply
pulled from one passes through it, including SecAgg+'s four stages (the workflow is handed
this Grid). It counts each message's bytes, Flower's serialised objects of its content (the
arrays' bytes, the records' keys and values), and with ``record=DIR`` writes
each message to DIR: ``traffic.jsonl`` (one line per message: direction, type, round,
node, bytes, and each record's keys with their values or, for arrays, dtype and shape) and
``NNNNN.npz`` with its arrays. That folder is exactly what the server has seen; the tests
read it to show that no message holds a case name, an unnoised figure or, under SecAgg+, a
site's unmasked update.

``send_and_receive`` polls every 0.2 s like dpseg's own exchange (Flower's HttpGrid sleeps
3 s between polls, which would add seconds to each of SecAgg+'s stages and make its cost
look larger than the protocol's).
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable
from pathlib import Path

import numpy as np
from flwr.app import Message, RecordDict
from flwr.common import bytes_to_ndarray
from flwr.serverapp import Grid
from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects

__all__ = ["TrafficGrid", "content_bytes"]


def content_bytes(content: RecordDict) -> int:
    """Bytes of a message's content as Flower serialises it for the wire."""
    return sum(len(o.deflate()) for o in get_all_nested_objects(content).values())


def _as_array(arr) -> np.ndarray:
    try:
        return arr.numpy()
    except Exception:  # legacy Parameters (SecAgg+'s FitIns/FitRes): np.save bytes, no dtype
        return bytes_to_ndarray(arr.data)


def _describe(value):
    if isinstance(value, bytes):
        return {"bytes": len(value)}
    if isinstance(value, list):
        return [_describe(v) for v in value]
    return value


class TrafficGrid(Grid):
    def __init__(self, grid: Grid, record: str | Path | None = None):
        self.grid = grid
        self.folder = Path(record) if record else None
        if self.folder is not None:
            self.folder.mkdir(parents=True, exist_ok=True)
        self.seq = 0
        self.sent = self.received = 0  # bytes so far; a round's are differences of these
        self.types: dict[str, str] = {}  # message id -> its type, for the replies

    # --- what the server sees -------------------------------------------------------------
    def _note(self, msg: Message, direction: str, kind: str) -> None:
        size = content_bytes(msg.content) if not msg.has_error() else 0
        if direction == "out":
            self.sent += size
        else:
            self.received += size
        group = msg.metadata.group_id
        if self.folder is None:
            return
        self.seq += 1
        node = msg.metadata.dst_node_id if direction == "out" else msg.metadata.src_node_id
        line: dict = {"seq": self.seq, "direction": direction, "type": kind, "round": group,
                      "node": int(node), "bytes": size, "records": {}}  # fmt: skip
        if msg.has_error():
            line["error"] = msg.error.reason
        else:
            arrays = {}
            for name, rec in msg.content.array_records.items():
                line["records"][name] = {}
                for key, arr in rec.items():
                    a = _as_array(arr)
                    arrays[f"{name}|{key}"] = a
                    line["records"][name][key] = {"dtype": str(a.dtype), "shape": list(a.shape)}
            for name, rec in [*msg.content.config_records.items(),
                              *msg.content.metric_records.items()]:  # fmt: skip
                line["records"][name] = {k: _describe(v) for k, v in rec.items()}
                for key, v in rec.items():  # bytes travel too (SecAgg+'s masked vectors)
                    for i, b in enumerate(v if isinstance(v, list) else [v]):
                        if isinstance(b, bytes):
                            arrays[f"{name}|{key}|{i}"] = np.frombuffer(b, np.uint8)
            if arrays:
                np.savez(self.folder / f"{self.seq:05d}.npz", **arrays)
        with (self.folder / "traffic.jsonl").open("a") as f:
            f.write(json.dumps(line) + "\n")

    def totals(self) -> tuple[int, int]:
        return self.sent, self.received

    # --- Grid -----------------------------------------------------------------------------
    def set_run(self, run) -> None:
        self.grid.set_run(run)

    @property
    def run(self):
        return self.grid.run

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None) -> Message:
        return self.grid.create_message(content, message_type, dst_node_id, group_id, ttl)

    def get_node_ids(self) -> Iterable[int]:
        return self.grid.get_node_ids()

    def get_nodes(self):
        return self.grid.get_nodes()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        messages = list(messages)
        ids = list(self.grid.push_messages(messages))
        for msg, mid in zip(messages, ids, strict=True):
            self.types[mid] = msg.metadata.message_type
            self._note(msg, "out", msg.metadata.message_type)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        replies = list(self.grid.pull_messages(message_ids))
        for msg in replies:
            kind = self.types.pop(msg.metadata.reply_to_message_id, msg.metadata.message_type)
            self._note(msg, "in", kind)
        return replies

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        pending = set(self.push_messages(messages))
        deadline = None if timeout is None else time.monotonic() + timeout
        out: list[Message] = []
        while pending and (deadline is None or time.monotonic() < deadline):
            replies = list(self.pull_messages(pending))
            out += replies
            pending -= {m.metadata.reply_to_message_id for m in replies}
            if pending:
                time.sleep(0.2)
        return out
