# ruff: noqa  (kept as it was run)
"""SegResNet (48^3) and UNETR (64^3) under three allocator policies, one process each:
    .venv/bin/python docs/results/floor26/malloc10/policy_bench.py default|keep|trim32 segresnet|unetr
As run (from /tmp, output in policy_bench.txt) before the policies had their names:
"default" is glibc's (--freed-memory return), "trim32" is --freed-memory keep, "keep" is
what keep_freed_memory() did then, now --freed-memory keep-all."""
import ctypes, json, statistics, sys, warnings
warnings.filterwarnings("ignore")
policy, which = sys.argv[1], sys.argv[2]
libc = ctypes.CDLL("libc.so.6")
if policy == "keep":
    from dpseg.perf.allocator import keep_freed_memory
    assert keep_freed_memory(large_blocks=True)  # then keep_freed_memory() itself
elif policy == "trim32":
    assert libc.mallopt(-1, 2**31 - 1) == 1 and libc.mallopt(-3, 32 << 20) == 1
import torch
from dpseg.perf import bench_step
from dpseg.perf.user_model import example_batch, load_model
torch.manual_seed(0)
if which == "unetr":
    m = load_model("monai.networks.nets:UNETR", {"in_channels": 1, "out_channels": 2, "img_size": [64, 64, 64], "feature_size": 16, "hidden_size": 192, "mlp_dim": 768, "num_heads": 4}); size = 64; warm = 1
else:
    m = load_model("monai.networks.nets:SegResNet", {"spatial_dims": 3, "in_channels": 1, "out_channels": 2, "init_filters": 16}); size = 48; warm = 2
x, y = example_batch(m, 2, size, 1, 3, "cpu")
r = bench_step(m, x, y, engines=("none", "dpseg"), repeats=15, warmup=warm, round_seconds=1.0).as_dict()
res = {e["engine"]: e for e in r["results"]}
a, b = res["dpseg"]["samples_s"], res["none"]["samples_s"]
rat = [p / q for p, q in zip(a, b)]
q = statistics.quantiles(rat)
print(policy, which, f"none {1e3*res['none']['median_s']:.0f} ms dpseg {1e3*res['dpseg']['median_s']:.0f} ms ratio {statistics.median(rat):.3f} IQR {q[0]:.3f}-{q[2]:.3f} peak none {res['none']['peak_bytes']/2**20:.0f} dpseg {res['dpseg']['peak_bytes']/2**20:.0f} MiB", r["environment"].get("huge_pages"))
