"""A site's privacy state on the site's own disk: what a hospital has released survives its
SuperNode.

``SiteStore(folder)`` keeps two files there (the node config's ``state-dir``):

- ``site_state.pt``: ``Site.state_dict()``: optimizer moments, the DP step counter, the
  site's step count, the accountant history, whether the budget is spent (no generator
  state and no noise seed: the site's ``secret.key`` beside it keys those, see
  dpseg.federated.flower.client).
  Replaced atomically (a temporary file, fsync, rename, fsync of the folder), so a crash
  leaves the previous state or the new one, never a torn file.
- ``releases.jsonl``: one line per update that left the site (round, DP steps, epsilon
  after it, time), appended and fsynced. The hospital's own record of what it released.

The ClientApp writes both *before* its reply leaves the node. A crash after the write and
before the send costs the site that release's privacy without the server having received
it: the ledger counts a release the server may then ask for again, never the other way
round. A release is never missing from the ledger.

The two files check each other when the state is loaded (``check_not_behind``): a state
whose ledger has spent less than the release log says was released (an older backup put
back, or the state file lost while the log survived) is refused, since training on it would
restart the site's epsilon below what its patients have already paid.
"""

from __future__ import annotations

import contextlib
import fcntl
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


class StaleSiteState(RuntimeError):
    """The site's state on disk is older than its own release log."""


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

    @contextlib.contextmanager
    def lock(self):
        """Holds the folder for one message (load, train, save): a second process on the
        same state-dir would otherwise train from the same state and one of the two
        releases would vanish from site_state.pt when the other's rename lands."""
        self.folder.mkdir(parents=True, exist_ok=True)
        with open(self.folder / ".lock", "w") as f:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise StaleSiteState(
                    f"{self.folder} is in use by another process: give each SuperNode its "
                    "own state-dir"
                ) from None
            try:
                yield self
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    def _repair_torn_tail(self, path: Path) -> None:
        """Cuts a last line left without its newline by a crash mid-append (its reply never
        left: the state was saved first), so the next release starts a line of its own."""
        data = path.read_bytes()
        if data and not data.endswith(b"\n"):
            with open(path, "r+b") as f:
                f.truncate(data.rfind(b"\n") + 1)
                f.flush()
                os.fsync(f.fileno())

    def record_release(self, entry: dict) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / RELEASES_FILE
        if path.exists():
            self._repair_torn_tail(path)
        with open(path, "a") as f:
            f.write(json.dumps({**entry, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def releases(self) -> list[dict]:
        """Every recorded release, oldest first. A last line torn by a crash mid-append is
        skipped: its state was saved first, and its reply never left the node."""
        path = self.folder / RELEASES_FILE
        if not path.exists():
            return []
        lines = [line for line in path.read_text().splitlines() if line.strip()]
        out = []
        for k, line in enumerate(lines):
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                if k != len(lines) - 1:
                    raise StaleSiteState(f"{path} line {k + 1} is corrupt: {line[:80]!r}") from None
        return out

    def check_not_behind(
        self, epsilon: float | None, has_state: bool, steps: int | None = None
    ) -> None:
        """Refuses a state that spent less than the release log records (see module doc):
        fewer DP steps than the releases add up to, or a lower epsilon than the last one."""
        released = self.releases()
        if not released:
            return
        if not has_state:
            raise StaleSiteState(
                f"{self.folder} records {len(released)} releases but holds no {STATE_FILE}: "
                "this site's privacy ledger is lost, and a fresh one would begin at epsilon 0. "
                f"Restore the latest {STATE_FILE} from the hospital's backup"
            )
        logged = sum(int(r.get("steps", 0)) for r in released)
        if steps is not None and steps < logged:
            raise StaleSiteState(
                f"{self.state_path} has taken {steps} DP steps, but {RELEASES_FILE} records "
                f"releases of {logged}: the state is older than the log (an old backup, or "
                f"two processes on one state-dir?). Restore the {STATE_FILE} saved with the "
                "last release"
            )
        last = max((r["epsilon"] for r in released if "epsilon" in r), default=None)
        if epsilon is not None and last is not None and epsilon < last * (1 - 1e-9):
            raise StaleSiteState(
                f"{self.state_path} has spent epsilon {epsilon:.4g}, but {RELEASES_FILE} "
                f"records a release at epsilon {last:.4g}: the state is older than the log "
                f"(an old backup?). Restore the {STATE_FILE} saved with the last release"
            )
