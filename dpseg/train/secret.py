"""The run's secret: what keys its Poisson draws and its noise.

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
import warnings
from pathlib import Path

import numpy as np

SECRET_FILE = "secret.key"


def run_secret(out: Path, given: int | None = None, create: bool = True) -> int:
    """The secret of the run in ``out``: ``given``, else the one saved there, else (with
    ``create``) a fresh one from OS entropy, saved owner-only."""
    if given is not None:
        return int(given)
    path = Path(out) / SECRET_FILE
    if path.exists():
        return int(path.read_text().strip())
    if not create:
        raise FileNotFoundError(f"{path}: the run's secret is missing")
    value = secrets.randbits(63)
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(f"{value}\n")
    os.replace(tmp, path)
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


def keyed_seed(seed: int, secret: int) -> int:
    """One 63-bit seed from the public --seed and the run's secret."""
    return int(
        np.random.SeedSequence([int(seed), int(secret)]).generate_state(1, np.uint64)[0] >> 1
    )
