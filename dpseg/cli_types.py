"""What every ``dpseg`` subcommand's parser shares: argument types and the usage error.

Here rather than in dpseg/cli.py, which imports the subcommands: they import this module,
never the command that imports them."""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable
from typing import Any


class UsageError(Exception):
    """A problem the user can fix; printed without a traceback, exit code 2."""


def csv_list(kind: Callable[[str], Any]) -> Callable[[Any], tuple]:
    """``--x 8,16,32`` -> ``(8, 16, 32)`` with each item converted by ``kind``. A list or tuple
    (a ``--config`` TOML value) is converted item by item. A bad item is an
    ``ArgumentTypeError``, which argparse prints as a usage error (exit 2)."""

    def parse(text: Any) -> tuple:
        items = text if isinstance(text, list | tuple) else str(text).split(",")
        try:
            return tuple(kind(t) for t in items if str(t).strip())
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected a comma-separated list of {getattr(kind, '__name__', 'values')}, "
                f"got {text!r}"
            ) from None

    parse.__name__ = f"{getattr(kind, '__name__', 'value')} list"
    return parse


# dpseg.perf.allocator.POLICIES, spelled here so that building the parser imports no torch
# (tests/test_perf_allocator.py holds the two equal).
FREED_MEMORY_POLICIES = ("keep", "keep-all", "return")


def add_freed_memory_option(p: argparse.ArgumentParser) -> None:
    """``--freed-memory keep|keep-all|return``, for the commands that run training steps;
    dpseg.cli.main applies it before a CPU run (dpseg.perf.allocator). The default is
    DPSEG_FREED_MEMORY's value, else keep."""
    p.add_argument(
        "--freed-memory",
        choices=FREED_MEMORY_POLICIES,
        default=os.environ.get("DPSEG_FREED_MEMORY", "keep"),
        help="CPU runs: keep (default): glibc never trims its heap, so blocks under 32 MiB that "
        "a step frees serve the next step instead of being faulted in again (steadier, 5-10%% "
        "faster steps on the development VM; resident memory stays at the step's high-water "
        "mark). keep-all: blocks of 32 MiB and more too (UNETR at 64^3: 1352 against 2102 ms a "
        "step, but SwinUNETR's resident memory grew to 1.8x). return: glibc's default",
    )
