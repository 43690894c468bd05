"""TLS and SuperNode authentication on loopback (``--tls``): a CA, the SuperLink's certificate
and each site's key made for the test with ``cryptography`` (dpseg.federated.flower.tls),
the SuperLink on HTTPS with node authentication on, the sites' keys registered with
``flwr supernode register``. A node that claims to be site0 with a key never registered is
refused: the refusal happens in the SuperLink, which the ServerApp cannot see, so it is read
from the SuperLink's log and the refused SuperNode's exit code. The run completes with the
registered sites, and no message the server received holds a case name or an unnoised
figure. And docs/flower.md shows the flags these commands run with.

Two to four minutes on 2 busy cores (Flower starts a process per message), hence slow."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import torch

from dpseg.federated.runner import FederatedConfig

ROOT = Path(__file__).resolve().parents[1]
TINY = dict(
    phantoms=8, sites=2, size=16, patch=16, channels=(4, 8), local_steps=2, batch_size=2,
    accountant="rdp", rounds=1, seed=3,
)  # fmt: skip
# Flags the loopback adds to the commands of docs/flower.md: free ports for Flower's legacy
# servers, and a Runtime API port for each of several SuperNodes on one machine.
LOOPBACK_ONLY = {
    "flower-superlink": {"--fleet-api-address", "--control-api-address"},
    "flower-supernode": {"--port"},
}


def _commands(text: str) -> dict[str, set[str]]:
    """{program (with a flwr subcommand): its flags} of the shell commands in ``text``."""
    out: dict[str, set[str]] = {}
    for line in text.replace("\\\n", " ").splitlines():
        words = shlex.split(line.strip()) if line.strip().startswith(("flower-", "flwr ")) else []
        if not words:
            continue
        program = words[0] if words[0] != "flwr" else " ".join(words[:3 if words[1] == "supernode"
                                                                        else 2])  # fmt: skip
        out.setdefault(program, set()).update(w for w in words if w.startswith("--"))
    return out


def _pem_lines(public_key: Path) -> list[str]:
    """The base64 lines of an OpenSSH public key in PEM, as the SuperLink logs a key."""
    from cryptography.hazmat.primitives import serialization

    key = serialization.load_ssh_public_key(public_key.read_bytes())
    pem = key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    ).decode()
    return [line for line in pem.splitlines() if not line.startswith("-----")]


@pytest.mark.slow
def test_tls_with_node_auth_refuses_an_unregistered_node(tmp_path):
    pytest.importorskip("flwr")
    from flower_harness import UNNOISED, case_names, sent_keys

    from dpseg.federated.flower.deploy import run_flower_deployment
    from dpseg.federated.flower.processes import free_ports

    out = tmp_path / "run"
    intruder = []

    def watch(line, d):
        if not intruder:  # once the sites are up: a machine with a key nobody registered
            key = d.node_key("intruder")
            intruder.append((d.start_node(0, key=key, name="intruder", port=free_ports(1)[0]), key))

    cfg = FederatedConfig(**TINY)
    report = run_flower_deployment(
        cfg, out, tls=True, on_line=watch, plots=False, threads=torch.get_num_threads(),
        timeout=900, round_timeout=300, record_traffic=tmp_path / "traffic", echo=print,
    )  # fmt: skip
    base = out / "flower"
    proc, key = intruder[0]
    # Refused: by the SuperLink, at activation, for that very key; the node gave up with
    # Flower's exit code 305 (logged; the process's status is 1, as for every Flower error).
    assert proc.returncode == 1, proc.returncode
    assert "Exit Code: 305" in (base / "supernode_intruder.log").read_text()
    link_log = (base / "superlink.log").read_text(errors="replace")
    refusals = [line for line in link_log.splitlines() if "No SuperNode found" in line]
    assert refusals and "ApiError:2004" in refusals[0]
    assert all(chunk in refusals[0] for chunk in _pem_lines(Path(f"{key}.pub")))
    assert "Failed to activate SuperNode" in (base / "supernode_intruder.log").read_text()
    # The registered sites were activated, over HTTPS, and the run completed with them.
    assert link_log.count("[Fleet.ActivateNode] Activated") == 2
    assert "running on https://127.0.0.1" in link_log
    assert [r["took_part"] for r in report["rounds"]] == [["site0", "site1"]]
    assert all(s["epsilon"]["dpseg"] > 0 for s in report["sites"].values())
    # What the server received: no case name, no unnoised figure (no --share-site-stats).
    text = (tmp_path / "traffic" / "traffic.jsonl").read_text()
    assert not [n for n in case_names(cfg, out) if n in text]
    assert not sent_keys(tmp_path / "traffic") & UNNOISED
    # Each site keyed its sampling and noise by a secret of its own, drawn on its node and
    # kept owner-only in its state-dir (the server's in OUT); none of them ever travelled.
    keys = [base / f"node{k}" / "site-state" / "secret.key" for k in range(2)]
    keys.append(out / "secret.key")
    secrets = [p.read_text().strip() for p in keys]
    assert len(set(secrets)) == 3
    assert all(p.stat().st_mode & 0o777 == 0o600 for p in keys)
    assert not [v for v in secrets if v in text]

    # docs/flower.md's commands are the ones run here, but for the loopback's own ports.
    ran = _commands((base / "commands.txt").read_text())
    documented = _commands((ROOT / "docs" / "flower.md").read_text())
    for program in ("flower-superlink", "flower-supernode", "flwr supernode register", "flwr run"):
        assert program in ran and program in documented, program
        assert documented[program] == ran[program] - LOOPBACK_ONLY.get(program, set()), program
    assert "--enable-supernode-auth" in ran["flower-superlink"]
    # The flwr connection has the keys the docs give it.
    toml = (base / "link" / "config.toml").read_text()
    assert re.findall(r"^(\w[\w-]*) =", toml, re.M) == ["default", "address", "root-certificates"]
