"""A local Flower deployment on loopback: one SuperLink and one SuperNode per site, each its
own process on 127.0.0.1, running dpseg.federated.flower's apps (``dpseg federate --runtime
flower``). docs/flower.md shows the same apps with each site on its own machine.

With ``tls=True`` (``--tls``) it runs as docs/flower.md says a real deployment must: a fresh
CA and SuperLink certificate (tls.py) in OUT/flower/certs, the SuperLink on HTTPS with
SuperNode authentication on (``--enable-supernode-auth``), each site's public key
registered with ``flwr supernode register`` before its SuperNode starts, and each SuperNode
checking the SuperLink's certificate (``--root-certificates``) and signing with its own key
(``--auth-supernode-private-key``). A node whose key is not registered is refused by the
SuperLink (its log: "No SuperNode found with the given public key"; the node exits with
Flower's code 305, status 1). Without it, every process runs ``--insecure``.

Layout under the run folder OUT::

    OUT/flower/app/pyproject.toml   the Flower App (its components are dpseg's apps, which
                                    the nodes import from the installed dpseg)
    OUT/flower/link/                FLWR_HOME of the SuperLink and the ``flwr`` CLI
    OUT/flower/node<k>/             FLWR_HOME of site k's SuperNode
    OUT/flower/node<k>/site-state/  site k's privacy state on "its own disk" (node config
                                    state-dir): a restarted node, and --resume, continue
                                    from it
    OUT/flower/certs/               --tls: CA, SuperLink certificate, the nodes' key pairs
    OUT/flower/commands.txt         every command run, one a line (docs/flower.md shows them)
    OUT/flower/*.log                every process's output

Every process is stopped with all its descendants on every exit path (processes.py), so an
error or a timeout leaves no process behind.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from dpseg.federated.flower.processes import (
    FlowerDeploymentError,
    executable,
    free_ports,
    kill_tree,
    stop,
    wait_port,
)
from dpseg.federated.report import summary_lines
from dpseg.federated.runner import FederatedConfig, SetupError, load_data

__all__ = ["Deployment", "FlowerDeploymentError", "run_flower_deployment", "write_app"]

CONNECTION = "dpseg-local"


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


class Deployment:
    """The processes of one loopback deployment; ``restart_node`` is what a hospital's
    operator (or a supervisor) does after a crash: the same node config and state-dir."""

    def __init__(self, base: Path, env: dict, link_port: int, names: list[str], ports: list[int],
                 tls: bool = False):  # fmt: skip
        self.base, self.env, self.link_port, self.tls = base, env, link_port, tls
        self.names, self.ports = names, ports
        self.procs: list[subprocess.Popen] = []  # all of them, stopped at close()
        self.unwatched: list[subprocess.Popen] = []  # expected to exit (a refused node)
        self.nodes: dict[int, subprocess.Popen] = {}
        self.logs: list = []
        self.certs = base / "certs"

    def start(self, cmd: list[str], name: str, home: Path, watch: bool = True) -> subprocess.Popen:
        home.mkdir(parents=True, exist_ok=True)
        f = open(self.base / f"{name}.log", "a")  # noqa: SIM115 (closed in close())
        self.logs.append(f)
        with (self.base / "commands.txt").open("a") as c:
            c.write(shlex.join([Path(cmd[0]).name, *cmd[1:]]) + "\n")
        proc = subprocess.Popen(
            cmd, stdout=f, stderr=subprocess.STDOUT, env={**self.env, "FLWR_HOME": str(home)},
            start_new_session=True, cwd=home,
        )  # fmt: skip
        self.procs.append(proc)
        if not watch:
            self.unwatched.append(proc)
        return proc

    def flwr(self, *args: str, timeout: float = 120.0) -> str:
        """Runs the ``flwr`` CLI against this SuperLink; its output, or an error."""
        cmd = [executable("flwr"), *args]
        with (self.base / "commands.txt").open("a") as c:
            c.write(shlex.join(["flwr", *args]) + "\n")
        home = self.base / "link"
        done = subprocess.run(
            cmd, capture_output=True, text=True, timeout=timeout, cwd=home,
            env={**self.env, "FLWR_HOME": str(home)},
        )  # fmt: skip
        if done.returncode != 0:
            raise FlowerDeploymentError(f"{shlex.join(['flwr', *args])} failed:\n{done.stdout}"
                                        f"{done.stderr}")  # fmt: skip
        return done.stdout

    def node_key(self, name: str) -> Path:
        """A fresh key pair for a node (``name``, ``name.pub`` under certs/)."""
        from dpseg.federated.flower.tls import make_node_key

        return make_node_key(self.certs, name)[0]

    def register(self, key: Path) -> None:
        self.flwr("supernode", "register", f"{key}.pub", CONNECTION)

    def state_dir(self, k: int) -> Path:
        return self.base / f"node{k}" / "site-state"

    def start_node(self, k: int, *, key: Path | None = None, name: str | None = None,
                   port: int | None = None) -> subprocess.Popen:  # fmt: skip
        """Site k's SuperNode (with --tls, signing with ``key``, by default site k's
        registered one). ``name`` and ``port`` start another node claiming to be site k
        (the tests' intruder), whose exit is not an error of the deployment."""
        site = self.names[k]
        security = ["--insecure"]
        if self.tls:
            key = key or self.certs / site
            security = ["--root-certificates", str(self.certs / "ca.crt"),
                        "--auth-supernode-private-key", str(key)]  # fmt: skip
        proc = self.start(
            [
                executable("flower-supernode"), *security, "--superlink",
                f"127.0.0.1:{self.link_port}", "--isolation", "subprocess",
                "--port", str(port or self.ports[k]), "--node-config",
                f'site-index={k} site="{site}" state-dir="{self.state_dir(k)}"',
            ],
            f"supernode_{name or site}", self.base / f"node{k}" if name is None else
            self.base / name, watch=name is None,
        )  # fmt: skip
        if name is None:
            self.nodes[k] = proc
        return proc

    def kill_node(self, k: int) -> None:
        """SIGKILL site k's SuperNode and everything it started: a crash, not a shutdown."""
        proc = self.nodes[k]
        kill_tree(proc)
        self.procs.remove(proc)

    def restart_node(self, k: int) -> None:
        self.kill_node(k)
        self.start_node(k)

    def close(self) -> None:
        stop(self.procs)
        for f in self.logs:
            f.close()


def _write_connection(home: Path, port: int, ca: Path | None) -> None:
    home.mkdir(parents=True, exist_ok=True)
    security = f'root-certificates = "{ca}"\n' if ca is not None else "insecure = true\n"
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\n'
        f'address = "127.0.0.1:{port}"\n{security}'
    )


def _start_link(d: Deployment, fleet_port: int, control_port: int) -> None:
    """The SuperLink, and with --tls each site's key registered with it."""
    home = d.base / "link"
    security = ["--insecure"]
    if d.tls:
        from dpseg.federated.flower.tls import make_certificates

        make_certificates(d.certs, ["127.0.0.1", "localhost"])
        security = ["--ssl-ca-certfile", str(d.certs / "ca.crt"), "--ssl-certfile",
                    str(d.certs / "server.crt"), "--ssl-keyfile", str(d.certs / "server.key"),
                    "--enable-supernode-auth"]  # fmt: skip
    _write_connection(home, d.link_port, d.certs / "ca.crt" if d.tls else None)
    link = d.start(
        [
            executable("flower-superlink"), *security, "--isolation", "subprocess",
            "--disable-runtime-dependency-installation", "--host", "127.0.0.1",
            "--port", str(d.link_port), "--fleet-api-address", f"127.0.0.1:{fleet_port}",
            "--control-api-address", f"127.0.0.1:{control_port}",
        ],
        "superlink", home,
    )  # fmt: skip
    wait_port(d.link_port, link, d.base / "superlink.log", 60.0)
    if d.tls:
        for name in d.names:
            d.register(d.node_key(name))


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
    tls: bool = False,
    record_traffic: str | Path | None = None,
) -> dict:
    """Runs ``cfg`` on a loopback Flower deployment; returns report.json's dict.

    ``threads`` > 0 sets torch's threads in each site's ClientApp (the sites share this
    machine's cores); ``timeout`` bounds the whole run in seconds, ``round_timeout`` the
    server's wait for one round's replies. ``resume`` continues a stopped run: the server
    from its checkpoint in OUT, each site from its state-dir. ``tls``: certificates and
    SuperNode authentication (module docstring). ``record_traffic``: a folder where the
    ServerApp writes every message it sends and receives (traffic.py). ``on_line(line,
    deployment)`` sees every line the ServerApp prints, and "" at every poll (the tests kill
    and restart nodes from it).
    """
    from dpseg.federated.flower.config import run_config_for
    from dpseg.federated.flower.server import server_state_path

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
    try:
        run_config = run_config_for(cfg, out, len(sites), plots=plots, threads=threads)
    except ValueError as exc:
        raise SetupError(str(exc)) from exc
    run_config.update({"resume": bool(resume), "round-timeout": float(round_timeout),
                       "record-traffic": str(record_traffic or "")})  # fmt: skip
    app = write_app(base / "app", run_config)
    (out / f"flower_{cfg.engines[0]}.pt").unlink(missing_ok=True)  # "done" is rewritten at the end
    (base / "commands.txt").unlink(missing_ok=True)
    # flwr 1.42 serves Fleet, Control and Runtime APIs over HTTP on the SuperLink's --port,
    # but still opens its legacy gRPC Fleet and Control servers (9092, 9093 by default): they
    # get free ports too, so that two runs, or another Flower on this machine, never clash.
    link_port, fleet_port, control_port, *node_ports = free_ports(3 + len(sites))
    # Flower starts its own helpers (flower-superexec, flwr-serverapp, flwr-clientapp) by
    # name: put this interpreter's scripts first on PATH, also when it was not activated.
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    # The sites run this process's policy for freed CPU memory (--freed-memory).
    from dpseg.perf.allocator import child_environment

    env = {
        **os.environ,
        **child_environment(),
        **(env or {}),
        "PATH": path,
        "PYTHONUNBUFFERED": "1",
    }
    deployment = Deployment(base, env, link_port, names, node_ports, tls=tls)
    try:
        _start_link(deployment, fleet_port, control_port)
        for k in range(len(names)):
            deployment.start_node(k)
        echo(
            f"Flower: SuperLink on 127.0.0.1:{link_port}{' (TLS, node auth)' if tls else ''}, "
            f"{len(names)} SuperNodes ({', '.join(names)}); logs in {base}"
        )
        _run(deployment, app, out / f"flower_{cfg.engines[0]}.pt", timeout, echo, on_line)
    finally:
        deployment.close()
    report = json.loads((out / "report.json").read_text())
    for line in summary_lines(report):
        echo(line)
    return report


def _run(d: Deployment, app: Path, result: Path, timeout: float, echo, on_line) -> None:
    """Submits the app with ``flwr run`` and waits for the ServerApp's final weights."""
    log = d.base / "flwr_run.log"
    log.unlink(missing_ok=True)
    run = d.start([executable("flwr"), "run", str(app), CONNECTION, "--stream"], "flwr_run",
                  d.base / "link")  # fmt: skip
    deadline = time.monotonic() + timeout
    progress = _Progress(log, echo, lambda line: on_line and on_line(line, d))
    ended: float | None = None
    while not result.exists():
        progress.poll()
        if on_line is not None:
            on_line("", d)  # a tick: watchers look at the nodes' side too
        for p in list(d.procs):
            if p.poll() is not None and p is not run and p in d.procs and p not in d.unwatched:
                raise FlowerDeploymentError(
                    f"a Flower process exited early ({Path(p.args[0]).name}); see {d.base}"
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
