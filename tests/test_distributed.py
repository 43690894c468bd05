"""DP-SGD on torch.distributed (2 gloo processes on CPU) against the float64 single-process
microbatch oracle on the union of the ranks' samples."""

from __future__ import annotations

import socket

import pytest
import torch
import torch.multiprocessing as mp
from opacus.accountants import RDPAccountant
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import dpseg
from dpseg.privacy.data_loader import DistributedPoissonBatchSampler, PoissonBatchSampler
from tests import ddp_workers
from tests.oracle import dp_sum, per_sample_grads, per_unit_grads
from tests.test_engine_oracle import SmallSegNet, seg_loss_mean

WORLD = 2


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn(fn, tmp_path, cfg: dict) -> list[dict]:
    mp.spawn(fn, args=(WORLD, _port(), str(tmp_path), cfg), nprocs=WORLD, join=True)
    return [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]


def _flat(state: dict) -> torch.Tensor:
    return torch.cat([v.flatten() for v in state.values()])


def _oracle_updates(runs: list[dict], C: float, expected_batch: int, reduction: str):
    """The float64 single-process DP update of each step on the union of the ranks' samples."""
    torch.manual_seed(0)
    model = SmallSegNet().double()
    x, y = ddp_workers.data()
    out = []
    for step in range(len(runs[0]["seen"])):
        members = torch.cat([r["seen"][step] for r in runs])
        _, summed = dp_sum(per_sample_grads(model, seg_loss_mean, x[members], y[members]), C)
        scale = 1 / expected_batch if reduction == "mean" else 1.0
        update = {n: scale * summed[n] for n, _ in model.named_parameters()}
        out.append(torch.cat([u.flatten() for u in update.values()]))
        with torch.no_grad():
            for n, p in model.named_parameters():
                p.sub_(update[n])
    return out


def _assert_matches_oracle(runs, C, reduction):
    assert runs[0]["expected_batch"] == runs[1]["expected_batch"] == 4  # q N: global
    want = _oracle_updates(runs, C, runs[0]["expected_batch"], reduction)
    for r in runs:
        for step, expected in enumerate(want):
            got = _flat(r["states"][step]) - _flat(r["states"][step + 1])
            err = (got - expected).abs().max()
            assert err <= 1e-9 * expected.abs().max(), (step, float(err))
    # Some samples on each rank, and each patient in at most one rank's batch.
    for step in range(len(want)):
        a, b = (set(r["seen"][step].tolist()) for r in runs)
        assert not a & b


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("physical", [None, 1, 2])
def test_noise_free_update_equals_the_single_process_oracle(tmp_path, reduction, physical):
    # 12 patients, per-rank loader batch 4: q = 1/3, global expected batch 4, 3 steps.
    cfg = dict(reduction=reduction, sigma=0.0, C=0.5, steps=3, batch=4, seed=11,
               physical=physical)  # fmt: skip
    runs = _spawn(ddp_workers.train, tmp_path, cfg)
    _assert_matches_oracle(runs, 0.5, reduction)
    assert all(r["steps_taken"] == 3 and r["grad_sync"] is False for r in runs)


def test_batch_memory_manager_under_ddp(tmp_path):
    cfg = dict(sigma=0.0, C=0.5, batch=4, seed=5, physical=1, n=12)
    runs = _spawn(ddp_workers.batch_memory_manager, tmp_path, cfg)
    assert runs[0]["steps_taken"] == runs[1]["steps_taken"] == 3
    for r in runs:
        r["expected_batch"] = 4
    _assert_matches_oracle(runs, 0.5, "mean")


def test_declared_patients_stay_whole_on_one_rank(tmp_path):
    # 6 patients of 1-3 items, k = 2 items each (with replacement for the one-item ones),
    # physical batches of 2: every patient's rows on one rank, in one physical batch, and
    # each update the per-patient oracle's on the union of the ranks' patients.
    cfg = dict(C=0.05, seed=7, q=0.6, expected=3.6, k=2, physical=2, passes=3)
    runs = _spawn(ddp_workers.patient_units, tmp_path, cfg)
    owner = ddp_workers.PATIENT_OF_ITEM
    torch.manual_seed(0)
    model = SmallSegNet().double()
    x, y = ddp_workers.data(len(owner))
    steps = len(runs[0]["seen"])
    assert steps == runs[1]["steps_taken"] == 3 * 2  # round(1 / 0.6) = 2 steps a pass
    for step in range(steps):
        groups = []
        for r, run in enumerate(runs):
            rows = run["seen"][step].tolist()
            assert all(owner[i] % WORLD == r for i in rows)  # a patient lives on one rank
            groups += [rows[i : i + 2] for i in range(0, len(rows), 2)]
        assert all(owner[g[0]] == owner[g[1]] for g in groups)
        _, summed = dp_sum(per_unit_grads(model, seg_loss_mean, x, y, groups), 0.05)
        update = {n: summed[n] / 3.6 for n, _ in model.named_parameters()}
        expected = torch.cat([u.flatten() for u in update.values()])
        for run in runs:
            got = _flat(run["states"][step]) - _flat(run["states"][step + 1])
            assert (got - expected).abs().max() <= 1e-9 * max(expected.abs().max(), 1e-300)
        with torch.no_grad():
            for n, p in model.named_parameters():
                p.sub_(update[n])


def test_noise_is_added_once_and_the_replicas_are_bit_identical(tmp_path):
    base = dict(reduction="mean", C=0.5, steps=2, batch=4, seed=3)
    noisy = _spawn(ddp_workers.train, tmp_path, {**base, "sigma": 0.7})
    for step_state in range(3):  # bit for bit on every replica, at every step
        a, b = (_flat(r["states"][step_state]) for r in noisy)
        assert torch.equal(a, b)
    quiet = _spawn(ddp_workers.train, tmp_path, {**base, "sigma": 0.0})
    # Same seed, same batches: the difference of the first updates is the noise itself,
    # sigma C / B_global z(seed, step 0), drawn by rank 0 alone (twice would be sqrt(2) more).
    noise = (_flat(quiet[0]["states"][1]) - _flat(quiet[0]["states"][0])) - (
        _flat(noisy[0]["states"][1]) - _flat(noisy[0]["states"][0])
    )
    z = dpseg.ops.gaussian_noise(
        noise.numel(), seed=noisy[0]["noise_seed"], step=0, dtype=torch.float64, backend="torch"
    )
    torch.testing.assert_close(noise, 0.7 * 0.5 / 4 * z, rtol=1e-9, atol=1e-14)


def test_secure_mode_replicas_are_identical_with_rank_0s_entropy(tmp_path):
    # No shared seed: rank 0 draws each step's noise from OS entropy; the all-reduce hands
    # every replica the same noised sum.
    runs = _spawn(
        ddp_workers.train, tmp_path,
        dict(reduction="mean", sigma=1.0, C=0.5, steps=2, batch=4, seed=0, secure=True),
    )  # fmt: skip
    for step_state in range(3):
        assert torch.equal(*(_flat(r["states"][step_state]) for r in runs))
    update = _flat(runs[0]["states"][0]) - _flat(runs[0]["states"][1])
    # Clipped signal <= C / B per coordinate sum; the noise, sigma C / B = 0.125, dominates.
    assert 0.8 * 0.125 < float(update.std()) < 1.2 * 0.125


def test_epsilon_equals_a_single_process_run(tmp_path):
    runs = _spawn(
        ddp_workers.train, tmp_path,
        dict(reduction="mean", sigma=1.1, C=1.0, steps=3, batch=4, seed=1),
    )  # fmt: skip
    ref = RDPAccountant()
    for _ in range(3):
        ref.step(noise_multiplier=1.1, sample_rate=1 / 3)
    for r in runs:
        assert r["history"] == [(1.1, 1 / 3, 3)]  # one accountant step per step, not per rank
        assert r["epsilon"] == pytest.approx(ref.get_epsilon(1e-5), rel=1e-12)


def test_static_graph_ddp_is_refused(tmp_path):
    mp.spawn(
        ddp_workers.refuse_static_graph, args=(WORLD, _port(), str(tmp_path), {}), nprocs=WORLD
    )
    for r in range(WORLD):
        assert "static_graph=True is not supported" in (tmp_path / f"rank{r}.txt").read_text()


def test_the_split_poisson_draw_is_the_single_process_draw():
    n, q, steps = 101, 0.2, 30
    single = list(PoissonBatchSampler(n, q, steps, torch.Generator().manual_seed(4)))
    shards = [
        list(DistributedPoissonBatchSampler(n, q, steps, r, 3, torch.Generator().manual_seed(4)))
        for r in range(3)
    ]
    for t in range(steps):
        union = sorted(i for shard in shards for i in shard[t])
        assert union == single[t]
        for r in range(3):
            assert all(i % 3 == r for i in shards[r][t])


@pytest.mark.parametrize(
    "wrap,message",
    [
        (lambda m: nn.DataParallel(m), "DataParallel runs the replicas as threads"),
        (lambda m: torch.compile(m), "torch.compile'd module"),
        (lambda m: nn.Sequential(nn.DataParallel(m)), "DataParallel"),
    ],
)
def test_other_wrappers_are_refused_with_what_to_do(wrap, message):
    model = wrap(SmallSegNet().double())
    x, y = ddp_workers.data()
    with pytest.raises(ValueError, match=message):
        dpseg.PrivacyEngine().make_private(
            module=model, optimizer=torch.optim.SGD(model.parameters(), lr=1.0),
            data_loader=DataLoader(TensorDataset(x, y), batch_size=4),
            noise_multiplier=1.0, max_grad_norm=1.0,
        )  # fmt: skip


def test_an_unsupported_process_group_backend_is_refused(monkeypatch):
    from torch.nn.parallel import DistributedDataParallel

    from dpseg.privacy import distributed

    fake = DistributedDataParallel.__new__(DistributedDataParallel)
    nn.Module.__init__(fake)
    fake.process_group = None
    monkeypatch.setattr(distributed.dist, "get_backend", lambda group=None: "mpi")
    with pytest.raises(ValueError, match="backend is 'mpi'"):
        distributed.check_wrapper(fake)
