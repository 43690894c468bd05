"""Runs every CUDA kernel of dpseg._C once on small awkward inputs, for compute-sanitizer:

    compute-sanitizer --tool memcheck  --error-exitcode 1 python3 bench/sanitize_cuda_ops.py
    compute-sanitizer --tool racecheck --error-exitcode 1 python3 bench/sanitize_cuda_ops.py

Sizes straddle the 1024-element block (1023, 1025), include a scalar, an empty tensor and a
float64 tensor, so the tail masks, the table search and both dtypes are exercised.
"""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from dpseg.ops import triton_backend  # noqa: E402

if not triton_backend.cuda_kernels_built():
    sys.exit("dpseg._C has no CUDA kernels: build with DPSEG_BUILD_CUDA=1")
ops = torch.ops.dpseg
dev = "cuda"
shapes = [(1023,), (), (1025,), (0,), (3, 5, 7)]
grads = [torch.randn(3, *s, device=dev) for s in shapes]
grads[2] = grads[2].double()
offsets = [0, 1023, 1024, 2049, 2049]
c = torch.rand(3, dtype=torch.float64, device=dev)
ops.per_sample_sq_norms(grads)
ops.clip_accumulate_noise(grads, c, 1.0, 0.5, 7, 3, 4, offsets)
params = [torch.randn(s, device=dev, dtype=g.dtype) for s, g in zip(shapes, grads, strict=True)]
states = [[torch.zeros_like(p) for p in params] for _ in range(2)]
ops.clip_accumulate_noise_sgd_(params, states[0], grads, c, 1.0, 0.5, 7, 3, 1, offsets,
                               0.1, 0.9, 0.0, 0.01, True, False, True)  # fmt: skip
ops.clip_accumulate_noise_adam_(params, states[0], states[1], grads, c, 1.0, 0.5, 7, 3, 1,
                                offsets, 0.01, 0.9, 0.999, 1e-8, 0.1, True, False, 1)  # fmt: skip
out = torch.empty(4099, device=dev)
ops.gaussian_noise_(out, 7, 3, 11, 1)
ops.per_sample_sq_norms([torch.randn(0, 5, device=dev)])  # empty batch
torch.cuda.synchronize()
print("sanitize_cuda_ops: ok")
