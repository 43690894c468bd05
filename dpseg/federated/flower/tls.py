"""TLS certificates and SuperNode keys for a Flower deployment, made with ``cryptography``.

- ``make_certificates(folder, hosts)``: a CA (``ca.crt``, ``ca.key``) and the SuperLink's
  certificate (``server.crt``, ``server.key``) for the names or IP addresses in ``hosts``
  (its subjectAltName: what the SuperNodes and ``flwr`` check). Only ``ca.crt`` goes to the
  hospitals and the submitting machine; ``ca.key`` stays with whoever signs.
- ``make_node_key(folder, name)``: a SuperNode's key pair for node authentication, ECDSA on
  NIST P-384 in OpenSSH format (what ``ssh-keygen -t ecdsa -b 384`` writes, and what
  ``flower-supernode --auth-supernode-private-key`` and ``flwr supernode register`` read):
  ``name`` (private, stays on the hospital's machine) and ``name.pub`` (registered at the
  SuperLink).

The loopback deployment (``dpseg federate --runtime flower --tls``) makes a fresh set for
each run in OUT/flower/certs; for a real deployment the same from the command line::

    python -m dpseg.federated.flower.tls certs certs/ --host link.example.org
    python -m dpseg.federated.flower.tls node-key keys/ site0

Certificates are valid for ``days`` (default 365) from five minutes ago (clock skew).
"""

from __future__ import annotations

import argparse
import datetime
import ipaddress
import os
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

__all__ = ["make_certificates", "make_node_key"]

_PEM = serialization.Encoding.PEM


def _name(common: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common)])


def _san(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


def _write_private(path: Path, data: bytes) -> None:
    path.write_bytes(data)
    os.chmod(path, 0o600)


def make_certificates(folder: str | Path, hosts: list[str], days: int = 365) -> dict[str, Path]:
    """A CA and a server certificate for ``hosts``; returns their paths by file name."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.timezone.utc)
    start, end = now - datetime.timedelta(minutes=5), now + datetime.timedelta(days=days)
    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_name = _name("dpseg federation CA")
    ca = (
        x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name)
        .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(start).not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                          content_commitment=False, key_encipherment=False,
                          data_encipherment=False, key_agreement=False, encipher_only=False,
                          decipher_only=False),
            critical=True,
        )
        .sign(ca_key, hashes.SHA384())
    )  # fmt: skip
    key = ec.generate_private_key(ec.SECP384R1())
    cert = (
        x509.CertificateBuilder().subject_name(_name(hosts[0])).issuer_name(ca_name)
        .public_key(key.public_key()).serial_number(x509.random_serial_number())
        .not_valid_before(start).not_valid_after(end)
        .add_extension(x509.SubjectAlternativeName([_san(h) for h in hosts]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA384())
    )  # fmt: skip
    pkcs8, none = serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    paths = {n: folder / n for n in ("ca.crt", "ca.key", "server.crt", "server.key")}
    paths["ca.crt"].write_bytes(ca.public_bytes(_PEM))
    _write_private(paths["ca.key"], ca_key.private_bytes(_PEM, pkcs8, none))
    paths["server.crt"].write_bytes(cert.public_bytes(_PEM))
    _write_private(paths["server.key"], key.private_bytes(_PEM, pkcs8, none))
    return paths


def make_node_key(folder: str | Path, name: str) -> tuple[Path, Path]:
    """(private key, public key) of a SuperNode, OpenSSH format, ECDSA P-384."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    key = ec.generate_private_key(ec.SECP384R1())
    private, public = folder / name, folder / f"{name}.pub"
    _write_private(
        private,
        key.private_bytes(_PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()),
    )
    public.write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
        )
        + b"\n"
    )
    return private, public


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m dpseg.federated.flower.tls", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    sub = p.add_subparsers(dest="what", required=True)
    c = sub.add_parser("certs", help="a CA and the SuperLink's certificate")
    c.add_argument("folder", type=Path)
    c.add_argument("--host", action="append", required=True,
                   help="the SuperLink's name or IP address (repeat for several)")  # fmt: skip
    c.add_argument("--days", type=int, default=365)
    k = sub.add_parser("node-key", help="a SuperNode's key pair for node authentication")
    k.add_argument("folder", type=Path)
    k.add_argument("name")
    args = p.parse_args(argv)
    if args.what == "certs":
        for path in make_certificates(args.folder, args.host, args.days).values():
            print(path)
    else:
        for path in make_node_key(args.folder, args.name):
            print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
