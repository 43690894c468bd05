"""The audited model and its data: many independent one-parameter models in one layer.

The model is ``nn.Linear(slots + data_dims, 1, bias=False)``, trained on the mean of its
output. Each weight w_k of the first ``slots`` is a model of its own (y = w_k x_k): a sample
whose input is ``magnitude * C * e_k`` (a Dirac canary) has the per-sample gradient
``magnitude * C * e_k``, which clipping must cut to C, in coordinate k alone. The gradient
of a linear model does not depend on its weights, so every step releases the same
mechanism, the worst case for DP-SGD. The last ``data_dims`` inputs carry ordinary samples
(random directions, norms around C: some clipped, some not) that never touch a slot.

Per run, a random half of the slots gets a canary (world 1) and the other half none (world
0): coordinate k of each released update is then one trial of world 1 or world 0. The
noise of different coordinates is independent (Philox keyed by element), and the other
canaries are part of the rest of the batch, so one DP step yields ``slots`` trials.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import Dataset

from dpseg.privacy.rules.transformer import register_forward_override


def canary_model(
    slots: int, data_dims: int, dtype=torch.float32, device="cpu", structure: str = "flat",
    tokens: int = 1,
) -> nn.Module:  # fmt: skip
    """The one-layer canary model; ``structure`` "tokens" takes (B, tokens, features) and
    sums the tokens' outputs (the Linear's (B, T, D) path), "windows" cuts the tokens into
    windows of two and runs the Linear on (B x windows, 2, features), as Swin's window
    attention does (the B x windows path). A sample's gradient is the same in all three:
    the sum of its tokens' inputs."""
    linear = nn.Linear(slots + data_dims, 1, bias=False).to(device=device, dtype=dtype)
    with torch.no_grad():
        linear.weight.zero_()
    if structure == "flat":
        return linear
    if structure == "tokens":
        return TokenCanary(linear)
    return WindowedCanary(linear, tokens)


class TokenCanary(nn.Module):
    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.linear = linear

    @property
    def weight(self) -> torch.Tensor:
        return self.linear.weight

    def forward(self, x):  # (B, T, D) -> (B, 1)
        return self.linear(x).sum(1)


class WindowedCanary(TokenCanary):
    """(B, T, D) cut into windows of two tokens, sample after sample, each window a row of
    (B x T/2, 2, D): a layout the capture is told of (dpseg.audit's forward override,
    registered below), as for Swin's window attention."""

    def __init__(self, linear: nn.Linear, tokens: int):
        super().__init__(linear)
        if tokens % 2:
            raise ValueError(f"the windowed canary needs an even number of tokens, got {tokens}")
        self.tokens = tokens

    def forward(self, x):
        b, t, d = x.shape
        return self.linear(x.reshape(b * t // 2, 2, d)).reshape(b, t, 1).sum(1)


def windowed_canary_forward(override, x):
    """WindowedCanary.forward with its windows declared batch-major to the capture."""
    b, t, d = x.shape
    with override.passes.batch_major(b * t // 2):
        return type(override.module).forward(override.module, x)


def spread_over_tokens(x: torch.Tensor, tokens: int) -> torch.Tensor:
    """(N, D) samples -> (N, tokens, D), each sample's input split evenly over its tokens
    (same per-sample gradient: the tokens' inputs sum to the sample's)."""
    return (x / tokens).unsqueeze(1).expand(-1, tokens, -1).contiguous()


class CanaryDataset(Dataset):
    """Canary k (input magnitude * C * e_slot[k]) for each world-1 slot, then the ordinary
    samples. ``__getitems__`` hands the DataLoader a batch in one indexing operation
    (2,000 rows: ~40x faster than one ``__getitem__`` each); the items are what an ordinary
    dataset of these tensors would give."""

    def __init__(self, inputs: torch.Tensor):
        self.inputs = inputs

    def __len__(self) -> int:
        return self.inputs.shape[0]

    def __getitem__(self, i):
        return (self.inputs[i],)

    def __getitems__(self, indices):
        return _Batch(self.inputs[torch.as_tensor(indices, dtype=torch.long)])


class _Batch(tuple):
    """A fetched batch: collate_batch passes it through."""

    def __new__(cls, x):
        return super().__new__(cls, (x,))

    def __len__(self) -> int:  # the number of samples, as a list of items would have
        return self[0].shape[0]


def collate_batch(batch):
    if isinstance(batch, _Batch):
        return [batch[0]]
    return [torch.stack([item[0] for item in batch])]


class MultiSampleCanaries(Dataset):
    """A patient canary of k rows, the way MONAI's multi-sample transforms hand a patient
    over: item i is a list of its rows, each a one-field tuple (collated by
    ``dpseg.data.flatten_collate`` or MONAI's ``list_data_collate``, which lay the lists out
    one sample a row). ``rows`` (R, d) holds the items' rows one item after another."""

    def __init__(self, rows: torch.Tensor, rows_per_item: list[int]):
        self.rows, self.counts = rows, list(rows_per_item)
        self.starts = torch.tensor([0, *self.counts]).cumsum(0).tolist()

    def __len__(self) -> int:
        return len(self.counts)

    def __getitem__(self, i):
        return [(self.rows[r],) for r in range(self.starts[i], self.starts[i + 1])]


def patient_rows(x: torch.Tensor, canaries: int, k: int) -> tuple[torch.Tensor, list[int]]:
    """The first ``canaries`` rows of x (the canaries) each repeated k times, then the
    rest once: (rows laid out patient by patient, rows per patient)."""
    if k == 1:
        return x, [1] * len(x)
    rows = torch.cat([x[:canaries].repeat_interleave(k, dim=0), x[canaries:]])
    return rows, [k] * canaries + [1] * (len(x) - canaries)


def make_inputs(
    world1_slots: torch.Tensor,
    slots: int,
    data_dims: int,
    ordinary: int,
    max_grad_norm: float,
    magnitude: float,
    generator: torch.Generator,
    dtype=torch.float32,
    device="cpu",
) -> torch.Tensor:
    """(canaries + ordinary, slots + data_dims) inputs."""
    n = len(world1_slots)
    x = torch.zeros(n + ordinary, slots + data_dims, dtype=dtype)
    x[torch.arange(n), world1_slots] = magnitude * max_grad_norm
    if ordinary:
        if data_dims == 0:
            raise ValueError("ordinary samples need data_dims > 0")
        d = torch.randn(ordinary, data_dims, generator=generator, dtype=torch.float64)
        norms = torch.empty(ordinary, dtype=torch.float64).uniform_(0.5, 2.0, generator=generator)
        x[n:, slots:] = (d / d.norm(dim=1, keepdim=True) * norms[:, None] * max_grad_norm).to(dtype)
    return x.to(device)


register_forward_override(f"{__name__}.WindowedCanary", windowed_canary_forward)
