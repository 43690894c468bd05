"""Named ranges for `dpseg profile` that cost nothing when no profiler is running.

``record_function`` costs ~6 us to enter and leave even with no profiler (measured, torch
2.13, CPU): about 20 ranges per captured conv step of a 60-layer net, ~2% of a 48^3 step of
MONAI's UNet. ``profiled("name")`` returns it only while a profiler records.
"""

from __future__ import annotations

from contextlib import nullcontext

from torch.autograd import _profiler_enabled
from torch.autograd.profiler import record_function

_NULL = nullcontext()


def profiled(name: str):
    return record_function(name) if _profiler_enabled() else _NULL
