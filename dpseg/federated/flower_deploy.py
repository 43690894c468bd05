"""A local Flower deployment on loopback: one SuperLink and one SuperNode per site, each its
own process on 127.0.0.1, running dpseg.federated.flower's apps (``dpseg federate --runtime
flower``). docs/flower.md shows the same apps with each site on its own machine.

Layout under the run folder OUT::

    OUT/flower/app/pyproject.toml   the Flower App (its components are dpseg's apps, which
                                    the nodes import from the installed dpseg)
    OUT/flower/link/                FLWR_HOME of the SuperLink and the ``flwr`` CLI
    OUT/flower/node<k>/             FLWR_HOME of site k's SuperNode
    OUT/flower/node<k>/site-state/  site k's privacy state on "its own disk" (node config
                                    state-dir): a restarted node, and --resume, continue
                                    from it
    OUT/flower/*.log                every process's output

Every process is started in a session of its own, and ``_stop`` ends each one together with
all its descendants (the SuperExec and ServerApp/ClientApp processes Flower spawns, which
detach into sessions of their own) by pid: first SIGTERM, then SIGKILL after a grace period.
It runs on every exit path, so an error or a timeout leaves no process behind.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from dpseg.federated.report import summary_lines
from dpseg.federated.runner import FederatedConfig, SetupError, load_data

__all__ = ["FlowerDeploymentError", "run_flower_deployment"]

CONNECTION = "dpseg-local"


class FlowerDeploymentError(RuntimeError):
    """The deployment did not finish: a process died or the run timed out (see its logs)."""


def _free_ports(n: int) -> list[int]:
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


def _executable(name: str) -> str:
    here = Path(sys.executable).parent / name
    found = str(here) if here.exists() else shutil.which(name)
    if found is None:
        raise SetupError(f"{name} not found; pip install 'dpseg[flower]'")
    return found


def _toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return repr(v)
    return json.dumps(str(v))  # a JSON string is a valid TOML basic string


def write_app(folder: Path, run_config: dict) -> Path:
    """The Flower App folder: a pyproject.toml whose components are dpseg's apps."""
    folder.mkdir(parents=True, exist_ok=True)
    lines = [
        "[build-system]",
        'requires = ["hatchling"]',
        'build-backend = "hatchling.build"',
        "",
        "[project]",
        'name = "dpseg-federated"',
        'version = "1.0.0"',
        "dependencies = []",
        "",
        "[tool.flwr.app]",
        'publisher = "dpseg"',
        "",
        "[tool.flwr.app.components]",
        'serverapp = "dpseg.federated.flower:server_app"',
        'clientapp = "dpseg.federated.flower:client_app"',
        "",
        "[tool.flwr.app.config]",
        *(f"{k} = {_toml_value(v)}" for k, v in run_config.items()),
        "",
    ]
    (folder / "pyproject.toml").write_text("\n".join(lines))
    return folder


def _write_connection(home: Path, port: int) -> None:
    home.mkdir(parents=True, exist_ok=True)
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\n'
        f'address = "127.0.0.1:{port}"\ninsecure = true\n'
    )


def _children(pid: int) -> list[int]:
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


def _stop(procs: list[subprocess.Popen], grace: float = 10.0) -> None:
    """SIGTERM each process and its descendants, then SIGKILL whatever is left."""
    tree: list[int] = []
    for p in reversed(procs):  # nodes first, the SuperLink last
        tree += _children(p.pid) if p.poll() is None else []
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


def _wait_port(port: int, proc: subprocess.Popen, log: Path, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise FlowerDeploymentError(f"the SuperLink exited at start; see {log}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise FlowerDeploymentError(f"the SuperLink did not open port {port} in {timeout:.0f} s")


class Deployment:
    """The processes of one loopback deployment; ``restart_node`` is what a hospital's
    operator (or a supervisor) does after a crash: the same node config and state-dir."""

    def __init__(self, base: Path, env: dict, link_port: int, names: list[str], ports: list[int]):
        self.base, self.env, self.link_port = base, env, link_port
        self.names, self.ports = names, ports
        self.procs: list[subprocess.Popen] = []
        self.nodes: dict[int, subprocess.Popen] = {}
        self.logs: list = []

    def start(self, cmd: list[str], name: str, home: Path) -> subprocess.Popen:
        home.mkdir(parents=True, exist_ok=True)
        f = open(self.base / f"{name}.log", "a")  # noqa: SIM115 (closed in close())
        self.logs.append(f)
        proc = subprocess.Popen(
            cmd, stdout=f, stderr=subprocess.STDOUT, env={**self.env, "FLWR_HOME": str(home)},
            start_new_session=True, cwd=home,
        )  # fmt: skip
        self.procs.append(proc)
        return proc

    def state_dir(self, k: int) -> Path:
        return self.base / f"node{k}" / "site-state"

    def start_node(self, k: int) -> subprocess.Popen:
        name = self.names[k]
        proc = self.start(
            [
                _executable("flower-supernode"), "--insecure", "--isolation", "subprocess",
                "--superlink", f"127.0.0.1:{self.link_port}", "--port", str(self.ports[k]),
                "--node-config",
                f'site-index={k} site="{name}" state-dir="{self.state_dir(k)}"',
            ],
            f"supernode_{name}", self.base / f"node{k}",
        )  # fmt: skip
        self.nodes[k] = proc
        return proc

    def kill_node(self, k: int) -> None:
        """SIGKILL site k's SuperNode and everything it started: a crash, not a shutdown."""
        proc = self.nodes[k]
        tree = [*_children(proc.pid), proc.pid] if proc.poll() is None else []
        _signal(tree, signal.SIGKILL)
        proc.wait(timeout=10)
        self.procs.remove(proc)

    def restart_node(self, k: int) -> None:
        self.kill_node(k)
        self.start_node(k)

    def close(self) -> None:
        _stop(self.procs)
        for f in self.logs:
            f.close()


def run_flower_deployment(
    cfg: FederatedConfig,
    out: str | Path,
    *,
    plots: bool = True,
    threads: int = 0,
    timeout: float = 1800.0,
    echo: Callable[[str], None] = print,
    resume: bool = False,
    round_timeout: float = 3600.0,
    on_line: Callable[[str, Deployment], None] | None = None,
    env: dict | None = None,
) -> dict:
    """Runs ``cfg`` on a loopback Flower deployment; returns report.json's dict.

    ``threads`` > 0 sets torch's threads in each site's ClientApp (the sites share this
    machine's cores); ``timeout`` bounds the whole run in seconds, ``round_timeout`` the
    server's wait for one round's replies. ``resume`` continues a stopped run: the server
    from its checkpoint in OUT, each site from its state-dir. ``on_line(line, deployment)``
    sees every line the ServerApp prints, and "" at every poll (the tests kill and restart
    nodes from it).
    """
    from dpseg.federated.flower import run_config_for, server_state_path

    cfg.check()
    if len(cfg.engines) != 1:
        raise SetupError("--runtime flower runs one engine; drop --compare or use the simulator")
    out = Path(out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    state = server_state_path(out, cfg.engines[0])
    if resume and not state.exists():
        raise SetupError(f"{out} holds no Flower run to resume ({state.name} is missing)")
    if resume:
        from dpseg.train.checkpoint import load_checkpoint

        cfg.check_resume(load_checkpoint(state).get("extra", {}).get("config", {}), state)
    if not resume and (out / "report.json").exists():
        raise SetupError(f"{out} already holds a run; choose a new --out, or pass --resume")
    # The phantoms are written once, here, before any node reads them.
    sites, _ = load_data(cfg, out, progress=False)
    names = [s.name for s in sites]
    base = out / "flower"
    run_config = run_config_for(cfg, out, len(sites), plots=plots, threads=threads)
    run_config.update({"resume": bool(resume), "round-timeout": float(round_timeout)})
    app = write_app(base / "app", run_config)
    (out / f"flower_{cfg.engines[0]}.pt").unlink(missing_ok=True)  # "done" is rewritten at the end
    # flwr 1.42 serves Fleet, Control and Runtime APIs over HTTP on the SuperLink's --port,
    # but still opens its legacy gRPC Fleet and Control servers (9092, 9093 by default): they
    # get free ports too, so that two runs, or another Flower on this machine, never clash.
    link_port, fleet_port, control_port, *node_ports = _free_ports(3 + len(sites))
    # Flower starts its own helpers (flower-superexec, flwr-serverapp, flwr-clientapp) by
    # name: put this interpreter's scripts first on PATH, also when it was not activated.
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    env = {**os.environ, **(env or {}), "PATH": path, "PYTHONUNBUFFERED": "1"}
    deployment = Deployment(base, env, link_port, names, node_ports)
    try:
        link_home = base / "link"
        _write_connection(link_home, link_port)
        link = deployment.start(
            [
                _executable("flower-superlink"), "--insecure", "--isolation", "subprocess",
                "--disable-runtime-dependency-installation", "--host", "127.0.0.1",
                "--port", str(link_port), "--fleet-api-address", f"127.0.0.1:{fleet_port}",
                "--control-api-address", f"127.0.0.1:{control_port}",
            ],
            "superlink", link_home,
        )  # fmt: skip
        _wait_port(link_port, link, base / "superlink.log", 60.0)
        for k in range(len(names)):
            deployment.start_node(k)
        echo(
            f"Flower: SuperLink on 127.0.0.1:{link_port}, {len(names)} SuperNodes "
            f"({', '.join(names)}); logs in {base}"
        )
        log = base / "flwr_run.log"
        log.unlink(missing_ok=True)
        run = deployment.start(
            [_executable("flwr"), "run", str(app), CONNECTION, "--stream"], "flwr_run", link_home
        )
        deadline = time.monotonic() + timeout
        result = out / f"flower_{cfg.engines[0]}.pt"
        progress = _Progress(log, echo, lambda line: on_line and on_line(line, deployment))
        ended: float | None = None
        while not result.exists():
            progress.poll()
            if on_line is not None:
                on_line("", deployment)  # a tick: watchers look at the nodes' side too
            for p in list(deployment.procs):
                if p.poll() is not None and p is not run and p in deployment.procs:
                    raise FlowerDeploymentError(
                        f"a Flower process exited early ({Path(p.args[0]).name}); see {base}"
                    )
            if run.poll() not in (None, 0):
                raise FlowerDeploymentError(f"flwr run failed; see {log}")
            if run.poll() == 0:  # the run ended; the ServerApp may still be saving
                ended = ended or time.monotonic()
                if time.monotonic() - ended > 15:
                    raise FlowerDeploymentError(f"the run ended without a result; see {log}")
            if time.monotonic() > deadline:
                raise FlowerDeploymentError(f"the run did not finish in {timeout:.0f} s")
            time.sleep(0.25)
        try:  # `flwr run --stream` returns once the run is over and its logs are out
            run.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass
        progress.poll()
    finally:
        deployment.close()
    report = json.loads((out / "report.json").read_text())
    for line in summary_lines(report):
        echo(line)
    return report


class _Progress:
    """Echoes the ServerApp's round lines from the streamed log as they arrive, and hands
    every new line to ``each``."""

    def __init__(self, log: Path, echo: Callable[[str], None], each: Callable[[str], None]):
        self.log, self.echo, self.each, self.seen = log, echo, each, 0

    def poll(self) -> None:
        try:
            lines = self.log.read_text(errors="replace").split("\n")[:-1]  # whole lines
        except OSError:
            return
        for line in lines[self.seen :]:
            if "] round " in line or line.startswith(("wrote ", "paused ")) or "resumed" in line:
                self.echo(line)
            self.each(line)
        self.seen = len(lines)
