"""The Flower processes of a loopback deployment, as plain OS processes: free ports, the
executables of this interpreter, and stopping a process with every descendant.

Every process is started in a session of its own, and ``stop`` ends each one together with
all its descendants (the SuperExec and ServerApp/ClientApp processes Flower spawns, which
detach into sessions of their own) by pid: first SIGTERM, then SIGKILL after a grace period.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from dpseg.federated.runner import SetupError

__all__ = [
    "FlowerDeploymentError", "children", "executable", "free_ports", "kill_tree", "stop",
    "wait_port",
]  # fmt: skip


class FlowerDeploymentError(RuntimeError):
    """The deployment did not finish: a process died or the run timed out (see its logs)."""


def free_ports(n: int) -> list[int]:
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def executable(name: str) -> str:
    here = Path(sys.executable).parent / name
    found = str(here) if here.exists() else shutil.which(name)
    if found is None:
        raise SetupError(f"{name} not found; pip install 'dpseg[flower]'")
    return found


def children(pid: int) -> list[int]:
    """Every descendant of ``pid`` (from /proc; empty where there is none)."""
    parents: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat[stat.rindex(")") + 2 :].split()[1])
        parents.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], [pid]
    while todo:
        for child in parents.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def _signal(pids: list[int], sig: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL a process and everything it started: a crash, not a shutdown."""
    tree = [*children(proc.pid), proc.pid] if proc.poll() is None else []
    _signal(tree, signal.SIGKILL)
    proc.wait(timeout=10)


def stop(procs: list[subprocess.Popen], grace: float = 10.0) -> None:
    """SIGTERM each process and its descendants, then SIGKILL whatever is left."""
    tree: list[int] = []
    for p in reversed(procs):  # nodes first, the SuperLink last
        tree += children(p.pid) if p.poll() is None else []
        tree.append(p.pid)
    _signal(tree, signal.SIGTERM)
    deadline = time.monotonic() + grace
    for p in procs:
        try:
            p.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass
    while time.monotonic() < deadline and any(Path(f"/proc/{pid}").exists() for pid in tree):
        time.sleep(0.1)
    _signal([pid for pid in tree if Path(f"/proc/{pid}").exists()], signal.SIGKILL)
    for p in procs:
        if p.poll() is None:
            p.wait(timeout=5)


def wait_port(port: int, proc: subprocess.Popen, log: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise FlowerDeploymentError(f"the SuperLink exited at start; see {log}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise FlowerDeploymentError(f"the SuperLink did not open port {port} in {timeout:.0f} s")
