"""A site's privacy state on the site's own disk: what a hospital has released survives its
SuperNode.

``SiteStore(folder)`` keeps two files there (the node config's ``state-dir``):

- ``site_state.pt``: ``Site.state_dict()``: optimizer moments, the DP step counter and
  noise seed, the accountant history, the samplers' RNG states, whether the budget is spent.
  Replaced atomically (a temporary file, fsync, rename, fsync of the folder), so a crash
  leaves the previous state or the new one, never a torn file.
- ``releases.jsonl``: one line per update that left the site (round, DP steps, epsilon
  after it, time), appended and fsynced. The hospital's own record of what it released.

The ClientApp writes both *before* its reply leaves the node. A crash after the write and
before the send costs the site that release's privacy without the server having received
it: the ledger counts a release the server may then ask for again, never the other way
round. A release is never missing from the ledger.
"""

from __future__ import annotations

import io
import json
import os
import time
from pathlib import Path

import torch

STATE_FILE = "site_state.pt"
RELEASES_FILE = "releases.jsonl"


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class SiteStore:
    def __init__(self, folder: str | Path):
        self.folder = Path(folder)

    @property
    def state_path(self) -> Path:
        return self.folder / STATE_FILE

    def exists(self) -> bool:
        return self.state_path.is_file()

    def load(self) -> dict | None:
        if not self.exists():
            return None
        return torch.load(self.state_path, weights_only=True)

    def save(self, state: dict) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        buf = io.BytesIO()
        torch.save(state, buf)
        tmp = self.folder / f".{STATE_FILE}.{os.getpid()}.tmp"
        with open(tmp, "wb") as f:
            f.write(buf.getvalue())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.state_path)
        _fsync_dir(self.folder)

    def record_release(self, entry: dict) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        with open(self.folder / RELEASES_FILE, "a") as f:
            f.write(json.dumps({**entry, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def releases(self) -> list[dict]:
        path = self.folder / RELEASES_FILE
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
