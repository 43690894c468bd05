# ruff: noqa  (kept as it was run)
"""Resident memory of a SwinUNETR step (feature 12, 64^3, batch 1, 1 thread) under three policies:
    .venv/bin/python docs/results/floor26/malloc10/resident_memory.py return|keep|trim 6
As run: "keep" here is --freed-memory keep-all, "trim" is --freed-memory keep. Prints, per
step, its seconds, then (RSS, VmHWM) in MiB above the start. Output: resident_memory.txt."""
import sys, json
import torch
import ctypes; L = ctypes.CDLL("libc.so.6")
if sys.argv[1] == "keep":
    L.mallopt(-1, -1); L.mallopt(-4, 0)
if sys.argv[1] == "trim":
    L.mallopt(-1, -1); L.mallopt(-3, 32 << 20)
torch.set_num_threads(1)
torch.manual_seed(0)
from monai.networks.nets import SwinUNETR
import inspect
kw = dict(in_channels=1, out_channels=2, feature_size=12, spatial_dims=3)
if "img_size" in inspect.signature(SwinUNETR).parameters:
    kw["img_size"] = (64, 64, 64)
m = SwinUNETR(**kw)
x = torch.randn(1, 1, 64, 64, 64); y = torch.randint(0, 2, (1, 64, 64, 64))
def st(f):
    for l in open("/proc/self/status"):
        if l.startswith(f): return int(l.split()[1]) // 1024
def step():
    m.zero_grad(set_to_none=True)
    torch.nn.functional.cross_entropy(m(x), y).backward()
base = st("VmRSS")
out = []
for _ in range(int(sys.argv[2])):
    import time; t = time.perf_counter(); step(); out.append((round(time.perf_counter() - t, 2),)); out.append((st("VmRSS") - base, st("VmHWM") - base))
print(sys.argv[1], "after each step (RSS, HWM) MiB above start:", out)
