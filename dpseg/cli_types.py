"""Argument types shared by every ``dpseg`` subcommand's parser."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any


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
