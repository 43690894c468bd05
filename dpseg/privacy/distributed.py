"""DP-SGD on torch.distributed: one site, several processes, one DP step.

How DDP and the capture fit. dpseg's capture hands autograd no parameter gradients, so
DistributedDataParallel's reducer would wait for gradients that never come, and what it would
all-reduce (the summed, unclipped gradient) is the wrong thing to share anyway. dpseg keeps
the DDP wrapper (the user's code, ``model.module``, ``no_sync()`` and state_dict keys keep
working) and captures the layers under ``ddp.module``, but takes the reduction away from
DDP's hooks (``require_backward_grad_sync = False``, the flag ``no_sync()`` sets, set for good)
and reduces in the DP step instead:

1. each rank clips its own samples (per-sample norms over all parameters) and sums them;
2. rank 0 adds the Gaussian noise to its sum, once for the whole step (Opacus's choice; in
   secure_mode from its own OS-entropy draw, which no other rank sees);
3. one all-reduce of all parameters' sums, flattened into a single buffer;
4. every rank scales by 1 / (q N), the global expected batch, and steps its optimizer.

The all-reduce hands every rank the same bits, so the replicas apply identical updates and
stay identical. It cannot overlap the backward: a clip factor needs the sample's norm over
every layer, known only when the backward has finished.

Sampling is one Poisson draw over the whole dataset, split by rank: each rank draws the same
N uniforms from the shared generator seed (or from its own OS entropy in secure_mode) and
keeps the items of its shard (index % world == rank), so every patient is in at most one
rank's batch and the global batch is Poisson at rate q over all N patients. With the same
seed the global batch equals a single-process run's (DistributedPoissonBatchSampler, in
dpseg.privacy.data_loader).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

SUPPORTED_BACKENDS = ("gloo", "nccl")


class DistributedContext:
    """The process group a DP step reduces over."""

    def __init__(self, group=None):
        self.group = group
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)

    def all_reduce_flat(self, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        """Sums each tensor over the ranks with one all-reduce of one flat buffer."""
        flat = torch.cat([t.reshape(-1) for t in tensors])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=self.group)
        return [
            chunk.view_as(t)
            for chunk, t in zip(flat.split([t.numel() for t in tensors]), tensors, strict=True)
        ]

    def broadcast_int(self, value: int) -> int:
        t = torch.tensor([value], dtype=torch.int64, device=self._device())
        dist.broadcast(
            t, src=dist.get_global_rank(self.group, 0) if self.group else 0, group=self.group
        )
        return int(t.item())

    def all_equal(self, value: int) -> bool:
        t = torch.tensor([value, -value], dtype=torch.int64, device=self._device())
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.group)
        return int(t[0]) == value and int(t[1]) == -value

    def _device(self) -> torch.device:
        backend = dist.get_backend(self.group)
        if backend == "nccl":
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")


_OTHER_WRAPPERS = {
    "DataParallel": "nn.DataParallel runs the replicas as threads of one process; wrap the "
    "model in DistributedDataParallel instead (one process per GPU)",
    "FullyShardedDataParallel": "FSDP shards parameters, and dpseg's per-sample gradients need "
    "each layer's full weight; use DistributedDataParallel",
    "OptimizedModule": "a torch.compile'd module; pass the uncompiled model to make_private",
    "GradSampleModule": "an Opacus module; pass the original model",
    "DifferentiallyPrivateDistributedDataParallel": "Opacus's DPDDP; pass the model wrapped in "
    "torch's DistributedDataParallel (or not wrapped)",
}


def check_wrapper(module: nn.Module) -> DistributedDataParallel | None:
    """The DDP wrapper around ``module``'s layers, or None; refuses wrappers dpseg cannot run
    exactly, with what to do instead."""
    for klass in type(module).__mro__:
        if klass.__name__ in _OTHER_WRAPPERS:
            raise ValueError(
                f"make_private got {type(module).__name__}: {_OTHER_WRAPPERS[klass.__name__]}"
            )
    for name, sub in module.named_modules():
        if sub is not module and isinstance(sub, DistributedDataParallel):
            raise ValueError(
                f"{name!r} is a DistributedDataParallel inside the model; wrap the whole model "
                "in DDP (outermost), or not at all"
            )
        if sub is not module and type(sub).__name__ in _OTHER_WRAPPERS:
            raise ValueError(
                f"{name!r} ({type(sub).__name__}): {_OTHER_WRAPPERS[type(sub).__name__]}"
            )
    if not isinstance(module, DistributedDataParallel):
        return None
    backend = dist.get_backend(module.process_group)
    if backend not in SUPPORTED_BACKENDS:
        raise ValueError(
            f"the process group's backend is {backend!r}; dpseg's distributed DP step runs on "
            f"{SUPPORTED_BACKENDS} (gloo on CPU, nccl on CUDA)"
        )
    for flag, what in (
        ("static_graph", "static_graph=True"),
        ("_delay_all_reduce_all_params", "delay_all_reduce_named_params"),
        ("_use_python_reducer", "the compiled (Python) reducer"),
    ):
        if getattr(module, flag, False):
            raise ValueError(
                f"DistributedDataParallel with {what} is not supported; build DDP without it"
            )
    return module


def take_reduction_from_ddp(ddp: DistributedDataParallel) -> None:
    """DDP keeps forwarding (and its buffers), but never reduces gradients: the DP step does."""
    ddp.require_backward_grad_sync = False
