# ruff: noqa  (kept as it was run)
"""peak_memory_call on a SwinUNETR step (feature 12, 64^3, batch 2, 2 threads) under each policy,
after dpseg.perf.allocator.released_on_free lowered the trim threshold for the measurement:
    .venv/bin/python docs/results/floor26/malloc10/peak_by_policy.py return|keep|keep-all
Output: peak_by_policy.txt."""
import sys, torch
from dpseg.perf.allocator import apply_policy, freed_memory_policy
from dpseg.perf.harness import peak_memory_call
apply_policy(sys.argv[1])
torch.set_num_threads(2); torch.manual_seed(0)
from monai.networks.nets import SwinUNETR
m = SwinUNETR(in_channels=1, out_channels=2, feature_size=12, spatial_dims=3)
x = torch.randn(2, 1, 64, 64, 64); y = torch.randint(0, 2, (2, 64, 64, 64))
def step():
    m.zero_grad(set_to_none=True)
    torch.nn.functional.cross_entropy(m(x), y).backward()
for _ in range(3): step()
print(sys.argv[1], [round(peak_memory_call(step) / 2**20) for _ in range(2)], freed_memory_policy())
