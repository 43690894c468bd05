"""The run's secret: what keys its Poisson draws and its noise.

Shared by ``dpseg train`` (RUN/secret.key) and ``dpseg federate``: the in-process
simulator keeps one secret for the run (OUT/secret.key) and gives each site a secret of its
own derived from it (``site_secret``); on Flower each SuperNode keeps its own in its
state-dir and the ServerApp its own in the run folder (client sampling and client-level
noise).

DP-SGD's guarantee assumes the adversary cannot replay the sampling or the noise. Keyed by
the run's --seed alone (printed in every report and command line) both could be recomputed
by anyone holding the run's record: the batches, and the noise to subtract from a released
model and its optimizer state. So each run draws a 63-bit secret from OS entropy, mixed into
the seeds of the sampler and the noise. It lives in RUN/secret.key (owner-only), never in
the checkpoint or the report, so a resumed run replays its own randomness exactly while a
shared checkpoint does not carry it. ``--secret-seed N`` fixes it instead, for tests and
reproductions: the randomness is then as public as N.
"""

from __future__ import annotations

import os
import secrets
import tempfile
import warnings
from pathlib import Path

import numpy as np

SECRET_FILE = "secret.key"


def _write_temp(folder: Path) -> tuple[Path, int]:
    """A new secret from OS entropy in an owner-only temporary file of ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    value = secrets.randbits(63)
    fd, tmp = tempfile.mkstemp(prefix=f".{SECRET_FILE}.", suffix=".tmp", dir=folder)
    with os.fdopen(fd, "w") as f:  # mkstemp: mode 600
        f.write(f"{value}\n")
        f.flush()
        os.fsync(f.fileno())
    return Path(tmp), value


def _read(path: Path) -> int:
    if path.stat().st_mode & 0o077:
        warnings.warn(
            f"{path} is readable by others (mode {path.stat().st_mode & 0o777:o}): whoever "
            f"reads it can replay the batches and the noise. chmod 600 {path}",
            stacklevel=3,
        )
    return int(path.read_text().strip())


def run_secret(out: Path, given: int | None = None, create: bool = True) -> int:
    """The secret of the run in ``out``: ``given``, else the one saved there, else (with
    ``create``) a fresh one from OS entropy, saved owner-only. Two processes that both
    find none agree on one: the file appears by a link, which fails for the loser."""
    if given is not None:
        return int(given)
    path = Path(out) / SECRET_FILE
    if path.exists():
        return _read(path)
    if not create:
        raise FileNotFoundError(f"{path}: the run's secret is missing")
    tmp, _ = _write_temp(path.parent)
    try:
        os.link(tmp, path)
    except FileExistsError:
        pass
    except OSError:  # a file system without hard links: create it exclusively instead
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(tmp.read_text())
        except FileExistsError:
            pass
    finally:
        tmp.unlink(missing_ok=True)
    return _read(path)


def new_secret(out: Path, given: int | None = None) -> int:
    """A fresh run's secret: ``given``, else a new one from OS entropy that replaces any
    ``secret.key`` an earlier run left in ``out``. A fresh run starts its steps at 0: with
    an earlier run's secret it would draw that run's batches and noise again, of releases
    already out."""
    if given is not None:
        return int(given)
    tmp, value = _write_temp(Path(out))
    os.replace(tmp, Path(out) / SECRET_FILE)
    return value


def resumed_secret(out: Path, given: int | None) -> int:
    """On --resume: the saved secret (exact replay); a run folder that lost it continues
    with fresh randomness, which is private but no longer the uninterrupted run's."""
    if given is not None or (Path(out) / SECRET_FILE).exists():
        return run_secret(out, given)
    warnings.warn(
        f"{Path(out) / SECRET_FILE} is missing: the resumed steps draw fresh batches and noise "
        "(private, but not those the uninterrupted run would have drawn)",
        stacklevel=2,
    )
    return run_secret(out, None)


def derive_seed(*keys: int) -> int:
    """A 63-bit seed from integer keys (independent streams for each site and purpose)."""
    return int(np.random.SeedSequence([int(k) for k in keys]).generate_state(2, np.uint64)[0] >> 1)


def site_secret(secret: int, index: int) -> int:
    """Site ``index``'s own secret, from a federation's secret (the simulator's run secret,
    or --secret-seed on every runtime, which is what makes Flower and the simulator draw
    the same batches and noise in the tests)."""
    return derive_seed(secret, 7, index)


def server_secret(secret: int) -> int:
    """The server's secret (which sites take part in a round, client-level noise)."""
    return derive_seed(secret, 21)


def keyed_seed(seed: int, secret: int) -> int:
    """One 63-bit seed from the public --seed and the run's secret."""
    return int(
        np.random.SeedSequence([int(seed), int(secret)]).generate_state(1, np.uint64)[0] >> 1
    )


def without_noise_seed(optimizer_state: dict) -> dict:
    """An optimizer's state without dpseg's noise seed, for a checkpoint: with the seed
    anyone holding the checkpoint could regenerate the noise. A resumed run derives it again
    from its secret. (Opacus's DPOptimizer keeps no seed in its state.)"""
    dp = optimizer_state.get("dpseg")
    if isinstance(dp, dict) and "noise_seed" in dp:
        optimizer_state = {
            **optimizer_state,
            "dpseg": {k: v for k, v in dp.items() if k != "noise_seed"},
        }
    return optimizer_state
