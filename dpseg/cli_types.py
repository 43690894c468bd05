"""What every ``dpseg`` subcommand's parser shares: argument types and the usage error.

Here rather than in dpseg/cli.py, which imports the subcommands: they import this module,
never the command that imports them."""

from __future__ import annotations

import argparse
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


def add_freed_memory_option(p: argparse.ArgumentParser) -> None:
    """``--freed-memory keep|return``, for the commands that run training steps on the CPU;
    dpseg.cli.main applies it before the command runs (dpseg.perf.allocator)."""
    p.add_argument(
        "--freed-memory",
        choices=("keep", "return"),
        default="keep",
        help="keep (default): memory a step frees stays in this process for the next step "
        "(glibc), so steps do not fault it in again; CPU steps ran steadier and 6-10%% faster "
        "(UNETR at 64^3: 2x) on the development VM, and resident memory stays at the step's "
        "peak between steps. return: glibc's default, which hands freed memory back to the "
        "kernel",
    )
