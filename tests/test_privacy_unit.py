"""The patient as the unit of privacy, held against the float64 per-patient oracle.

The oracle is a loop over patients: each patient's gradient is that of its own rows' loss
(the mean of its rows' per-sample gradients), clipped to C as one; the update is the sum
over patients divided by the declared expected batch. Independent of dpseg's capture,
loaders and unit maps.
"""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, IterableDataset, TensorDataset

import dpseg
from dpseg.data import flatten_collate
from dpseg.privacy import BatchMemoryManager, UnitMapError
from tests.oracle import dp_sum, per_unit_grads
from tests.test_engine_oracle import SmallSegNet, seg_loss_mean, seg_loss_sum

RTOL = 1e-9


def _rows(n: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 4, 4, 2, generator=g, dtype=torch.float64)
    y = torch.randint(0, 2, (n, 4, 4, 2), generator=g)
    return x, y


class MultiSample(Dataset):
    """Item i is patient i: a list of its rows (x, y, row id), as a multi-sample transform
    hands them over."""

    def __init__(self, x, y, rows_per_patient):
        self.x, self.y, self.counts = x, y, list(rows_per_patient)
        self.starts = [sum(self.counts[:i]) for i in range(len(self.counts))]

    def __len__(self):
        return len(self.counts)

    def __getitem__(self, i):
        start = self.starts[i]
        return [
            (self.x[r], self.y[r], torch.tensor(r)) for r in range(start, start + self.counts[i])
        ]


def _flat(model) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def _quiet_make_private(engine, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return engine.make_private(**kwargs)


def _expected_update(oracle_model, loss_fn, x, y, groups, C, expected, reduction):
    per_unit = per_unit_grads(oracle_model, loss_fn, x, y, groups)
    norms, summed = dp_sum(per_unit, C)
    scale = 1 / expected if reduction == "mean" else 1.0
    return norms, torch.cat(
        [scale * summed[n].flatten() for n, _ in oracle_model.named_parameters()]
    )


def _assert_close(got, expected):
    err = (got - expected).abs().max()
    assert err <= RTOL * max(float(expected.abs().max()), 1e-300) or err < 1e-15, float(err)


def _row_groups(row_ids: torch.Tensor, rows_per_patient) -> list[list[int]]:
    """The batch's rows (in batch order) grouped by the patient they belong to."""
    starts = [sum(rows_per_patient[:i]) for i in range(len(rows_per_patient))]
    owner = {
        r: p
        for p, (s, k) in enumerate(zip(starts, rows_per_patient, strict=True))
        for r in range(s, s + k)
    }
    groups: dict[int, list[int]] = {}
    for r in row_ids.tolist():
        groups.setdefault(owner[r], []).append(r)
    return list(groups.values())


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_multi_sample_items_are_clipped_as_one_patient(reduction):
    # Patients of 1 to 4 rows each; every step's update equals the per-patient oracle's.
    counts = [1, 3, 2, 4, 1, 2, 3]
    x, y = _rows(sum(counts))
    model = SmallSegNet().double()
    oracle_model = copy.deepcopy(model)
    loss_fn = seg_loss_mean if reduction == "mean" else seg_loss_sum
    engine = dpseg.PrivacyEngine(accountant="rdp")
    loader = DataLoader(MultiSample(x, y, counts), batch_size=3, collate_fn=flatten_collate)
    pmodel, opt, loader = _quiet_make_private(
        engine, module=model, optimizer=torch.optim.SGD(model.parameters(), lr=1.0),
        data_loader=loader, noise_multiplier=0.0, max_grad_norm=1.0, loss_reduction=reduction,
        sample_rate=0.5, expected_batch_size=3.5, noise_seed=11,
    )  # fmt: skip
    # C between the patients' norms: some clipped, some not.
    all_groups = _row_groups(torch.arange(sum(counts)), counts)
    norms, _ = dp_sum(per_unit_grads(oracle_model, seg_loss_mean, x, y, all_groups), 1.0)
    opt.max_grad_norm = C = float(norms.median())
    steps = 0
    for _ in range(3):
        for xb, yb, rows in loader:
            before = _flat(model)
            opt.zero_grad()
            loss_fn(pmodel(xb), yb).backward()
            opt.step()
            groups = _row_groups(rows, counts)
            want_norms, expected = _expected_update(
                oracle_model, seg_loss_mean, x, y, groups, C, 3.5, reduction
            )
            _assert_close(before - _flat(model), expected)
            assert len(opt.last_per_sample_norms) == len(groups)  # one clip per patient
            torch.testing.assert_close(opt.last_per_sample_norms, want_norms, rtol=1e-9, atol=0)
            with torch.no_grad():
                for p, q in zip(oracle_model.parameters(), model.parameters(), strict=True):
                    p.copy_(q)
            steps += 1
    assert steps == 3 * len(loader) == 6  # round(1 / 0.5) steps a pass, from q alone
    spent = engine.get_privacy_spent(1e-5)
    assert spent["unit"] == "item" and spent["adjacency"] == "add/remove"


def test_declared_patients_sample_patients_and_bring_k_items():
    # 6 patients with 1..4 slices each, k = 2: a patient with one slice brings it twice
    # (with replacement), the others two distinct slices; rows of a patient are clipped as
    # one, the update is the oracle's.
    slices = [3, 1, 4, 2, 2, 3]
    patient_ids = [f"p{p}" for p, n in enumerate(slices) for _ in range(n)]
    x, y = _rows(len(patient_ids), seed=3)
    data = TensorDataset(x, y, torch.arange(len(x)))
    model = SmallSegNet().double()
    oracle_model = copy.deepcopy(model)
    engine = dpseg.PrivacyEngine(accountant="rdp")
    pmodel, opt, loader = _quiet_make_private(
        engine, module=model, optimizer=torch.optim.SGD(model.parameters(), lr=1.0),
        data_loader=DataLoader(data, batch_size=4), noise_multiplier=0.0, max_grad_norm=0.05,
        sample_rate=0.6, expected_batch_size=3, patient_ids=patient_ids, items_per_patient=2,
        noise_seed=4,
    )  # fmt: skip
    seen_rows = 0
    for _ in range(4):
        for xb, yb, rows in loader:
            before = _flat(model)
            opt.zero_grad()
            seg_loss_mean(pmodel(xb), yb).backward()
            opt.step()
            owner = [patient_ids[r] for r in rows.tolist()]
            groups: dict[str, list[int]] = {}
            for r, p in zip(rows.tolist(), owner, strict=True):
                groups.setdefault(p, []).append(r)
            for p, members in groups.items():
                assert len(members) == 2
                n = slices[int(p[1:])]
                if n >= 2:
                    assert len(set(members)) == 2  # without replacement
                else:
                    assert members[0] == members[1]  # the only slice, twice
            # Rows of a patient are consecutive in the batch.
            assert owner == [p for p in groups for _ in groups[p]]
            _, expected = _expected_update(
                oracle_model, seg_loss_mean, x, y, list(groups.values()), 0.05, 3, "mean"
            )
            _assert_close(before - _flat(model), expected)
            with torch.no_grad():
                for p, q in zip(oracle_model.parameters(), model.parameters(), strict=True):
                    p.copy_(q)
            seen_rows += len(rows)
    assert seen_rows > 0
    assert engine.guarantee.unit == "patient"
    assert engine.get_privacy_spent(1e-5)["unit"] == "patient"
    assert loader.num_units == 6 and engine.sample_rate == 0.6


def test_batch_memory_manager_never_splits_a_patient():
    # Logical batches of patients with 1..4 rows cut into physical batches of at most 5
    # items; each update equals the oracle's over the whole logical batch.
    counts = [2, 4, 1, 3, 4, 2, 1, 3]
    x, y = _rows(sum(counts), seed=5)
    model = SmallSegNet().double()
    oracle_model = copy.deepcopy(model)
    slices_ids = [p for p, n in enumerate(counts) for _ in range(n)]
    data = TensorDataset(x, y, torch.arange(len(x)))
    engine = dpseg.PrivacyEngine(accountant="rdp")
    pmodel, opt, loader = _quiet_make_private(
        engine, module=model, optimizer=torch.optim.SGD(model.parameters(), lr=1.0),
        data_loader=DataLoader(data, batch_size=4), noise_multiplier=0.0, max_grad_norm=0.05,
        sample_rate=0.7, expected_batch_size=5, patient_ids=slices_ids, items_per_patient=3,
        noise_seed=8,
    )  # fmt: skip
    updates = 0
    with BatchMemoryManager(data_loader=loader, max_physical_batch_size=5, optimizer=opt) as phys:
        seen, start = [], None
        for xb, yb, rows in phys:
            assert len(rows) <= 5 and len(rows) % 3 == 0  # whole patients of 3 items
            if start is None:
                start = _flat(model)
            opt.zero_grad()
            seg_loss_mean(pmodel(xb), yb).backward()
            taken = opt.steps_taken
            opt.step()
            seen.append(rows)
            if opt.steps_taken == taken:
                continue
            members = torch.cat(seen)
            groups = [members[i : i + 3].tolist() for i in range(0, len(members), 3)]
            assert all(len({slices_ids[r] for r in g}) == 1 for g in groups)
            _, expected = _expected_update(
                oracle_model, seg_loss_mean, x, y, groups, 0.05, 5, "mean"
            )
            _assert_close(start - _flat(model), expected)
            with torch.no_grad():
                for p, q in zip(oracle_model.parameters(), model.parameters(), strict=True):
                    p.copy_(q)
            seen, start = [], None
            updates += 1
    assert updates == len(loader) == 1
    with pytest.raises(ValueError, match="at least 3"):
        with BatchMemoryManager(data_loader=loader, max_physical_batch_size=2, optimizer=opt) as p:
            next(iter(p))


def test_the_monai_multi_crop_recipe_clips_one_unit_per_patient():
    monai = pytest.importorskip("monai")
    from monai.data import list_data_collate
    from monai.transforms import Compose, EnsureChannelFirstd, RandCropByPosNegLabeld

    g = torch.Generator().manual_seed(0)
    patients = []
    for i in range(5):
        image = torch.randn(12, 12, 8, generator=g).double()
        label = (torch.rand(12, 12, 8, generator=g) > 0.7).long()
        patients.append({"image": image, "label": label, "id": i})
    transform = Compose(
        [
            EnsureChannelFirstd(keys=["image", "label"], channel_dim="no_channel"),
            RandCropByPosNegLabeld(
                keys=["image", "label"], label_key="label", spatial_size=(4, 4, 2),
                pos=1, neg=1, num_samples=4,
            ),
        ]
    )  # fmt: skip
    transform.set_random_state(seed=0)
    dataset = monai.data.Dataset(patients, transform)
    net = monai.networks.nets.UNet(
        spatial_dims=3, in_channels=1, out_channels=2, channels=(4, 8), strides=(2,),
        num_res_units=0,
    ).double()  # fmt: skip
    oracle_model = copy.deepcopy(net)
    loss = monai.losses.DiceLoss(to_onehot_y=True, softmax=True, batch=False)
    engine = dpseg.PrivacyEngine(accountant="rdp")
    with pytest.warns(UserWarning, match="per dataset item"):
        pnet, opt, loader = engine.make_private(
            module=net, optimizer=torch.optim.SGD(net.parameters(), lr=1.0),
            data_loader=DataLoader(dataset, batch_size=2, collate_fn=list_data_collate),
            noise_multiplier=0.0, max_grad_norm=1e-3, sample_rate=0.5, expected_batch_size=2,
            criterion=loss, noise_seed=2,
        )  # fmt: skip
    checked = 0
    for batch in loader:
        before = _flat(net)
        opt.zero_grad()
        images, labels = batch["image"].as_tensor(), batch["label"].as_tensor()
        ids = batch["id"].tolist()
        assert len(images) == 4 * len(set(ids))  # 4 crops a patient, patients whole
        loss(pnet(images), labels).backward()
        opt.step()
        groups = [list(range(i, i + 4)) for i in range(0, len(images), 4)]
        assert len(opt.last_per_sample_norms) == len(groups)  # clipped units = patients
        _, expected = _expected_update(oracle_model, loss, images, labels, groups, 1e-3, 2, "mean")
        _assert_close(before - _flat(net), expected)
        with torch.no_grad():
            for p, q in zip(oracle_model.parameters(), net.parameters(), strict=True):
                p.copy_(q)
        checked += len(groups)
    assert checked > 0


def test_a_batch_the_unit_map_cannot_explain_is_refused():
    counts = [2, 3, 2]
    x, y = _rows(7)
    model = SmallSegNet().double()
    loader = DataLoader(MultiSample(x, y, counts), batch_size=3, collate_fn=flatten_collate)
    pmodel, opt, loader = _quiet_make_private(
        dpseg.PrivacyEngine(), module=model, optimizer=torch.optim.SGD(model.parameters(), lr=1),
        data_loader=loader, noise_multiplier=0.0, max_grad_norm=1.0, sample_rate=1.0,
        expected_batch_size=3,
    )  # fmt: skip
    xb, yb, _ = next(iter(loader))
    assert len(xb) == 7
    with pytest.raises(UnitMapError, match="cannot tell which rows"):
        pmodel(xb[:5])  # rows dropped after the loader: the map no longer fits
    pmodel(xb).sum().backward()  # the batch as the loader gave it
    opt.step()

    class Splits(Dataset):  # a collate that makes two rows of one tuple item
        def __len__(self):
            return 4

        def __getitem__(self, i):
            return (x[i], y[i])

    def doubling(items):
        xs = torch.stack([t[0] for t in items])
        return torch.cat([xs, xs]), torch.cat([torch.stack([t[1] for t in items])] * 2)

    other = SmallSegNet().double()
    with pytest.raises(UnitMapError, match="declare them with"):
        _, _, bad = _quiet_make_private(
            dpseg.PrivacyEngine(), module=other,
            optimizer=torch.optim.SGD(other.parameters(), lr=1),
            data_loader=DataLoader(Splits(), batch_size=2, collate_fn=doubling),
            noise_multiplier=0.0, max_grad_norm=1.0, sample_rate=1.0, expected_batch_size=4,
        )  # fmt: skip
        next(iter(bad))


def test_an_iterable_dataset_is_refused_and_a_replaced_sampler_is_named():
    class Stream(IterableDataset):
        def __iter__(self):
            yield from (torch.zeros(1, 4, 4, 2) for _ in range(3))

    model = SmallSegNet().double()
    with pytest.raises(TypeError, match="IterableDataset"):
        dpseg.PrivacyEngine().make_private(
            module=model, optimizer=torch.optim.SGD(model.parameters(), lr=1),
            data_loader=DataLoader(Stream(), batch_size=2), noise_multiplier=1.0,
            max_grad_norm=1.0,
        )  # fmt: skip
    x, y = _rows(8)
    weighted = torch.utils.data.WeightedRandomSampler(torch.ones(8), 8)
    with pytest.warns(UserWarning, match="WeightedRandomSampler was replaced by Poisson"):
        dpseg.PrivacyEngine().make_private(
            module=model, optimizer=torch.optim.SGD(model.parameters(), lr=1),
            data_loader=DataLoader(TensorDataset(x, y), batch_size=2, sampler=weighted),
            noise_multiplier=1.0, max_grad_norm=1.0,
        )  # fmt: skip


def test_items_per_patient_needs_patients_and_patients_need_poisson():
    x, y = _rows(4)
    model = SmallSegNet().double()
    args = dict(
        module=model, optimizer=torch.optim.SGD(model.parameters(), lr=1),
        data_loader=DataLoader(TensorDataset(x, y), batch_size=2), noise_multiplier=1.0,
        max_grad_norm=1.0,
    )  # fmt: skip
    with pytest.raises(ValueError, match="needs patient_ids"):
        dpseg.PrivacyEngine().make_private(**args, items_per_patient=2)
    with pytest.raises(ValueError, match="need poisson_sampling=True"):
        dpseg.PrivacyEngine().make_private(**args, patient_ids=[0, 0, 1, 1], poisson_sampling=False)
    with pytest.raises(ValueError, match="4 items"):
        dpseg.PrivacyEngine().make_private(**args, patient_ids=[0, 1, 1])


def test_patients_at_an_item_counted_rate_are_told_the_rate_that_fills_a_batch():
    """Without sample_rate, q = 1 / len(loader) counts batches of items: 5 patients of 8
    slices under batch_size 4 give q = 0.1, so a batch holds 0.5 patients on average, 0.5
    slices when each brings one (said, with the rate that fills the batch) and 4 when each
    brings 8 (not said; nor under a declared rate)."""
    x, y = _rows(40)
    ids = [i // 8 for i in range(40)]
    model = SmallSegNet().double()

    def said(patient_ids=ids, batch_size=4, **kwargs):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            dpseg.PrivacyEngine().make_private(
                module=model, optimizer=torch.optim.SGD(model.parameters(), lr=1),
                data_loader=DataLoader(TensorDataset(x, y), batch_size=batch_size),
                noise_multiplier=1.0, max_grad_norm=1.0, patient_ids=patient_ids, **kwargs,
            )  # fmt: skip
        return " ".join(str(w.message) for w in caught)

    text = said()
    assert "gives batches of 0.5 patients, 0.5 items on average" in text
    assert "sample_rate=0.8 and expected_batch_size=4 would fill a batch" in text
    # k = 3: 1.5 items a batch; 4 / (5 * 3) fills it with 1.333 patients
    text = said(items_per_patient=3)
    assert "0.5 patients, 1.5 items on average" in text
    assert "sample_rate=0.2667 and expected_batch_size=1.333 would fill a batch" in text
    assert "gives batches of" not in said(items_per_patient=8)
    # 2 patients of 20 under batch_size 16: q = 1/3, 0.667 items a batch; the rate that
    # would fill it is capped at 1, and the normaliser at the 2 patients there are
    text = said(patient_ids=[i // 20 for i in range(40)], batch_size=16)
    assert "sample_rate=1 and expected_batch_size=2 would fill a batch" in text
    assert "no amplification" in text
    assert "gives batches of" not in said(sample_rate=0.8, expected_batch_size=4)


def test_a_dataset_declaring_its_patients_is_sampled_by_patient():
    x, y = _rows(6)

    class Slices(TensorDataset):
        patient_ids = ["a", "a", "b", "c", "c", "c"]

    model = SmallSegNet().double()
    engine = dpseg.PrivacyEngine()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _, _, loader = engine.make_private(
            module=model, optimizer=torch.optim.SGD(model.parameters(), lr=1),
            data_loader=DataLoader(Slices(x, y), batch_size=2), noise_multiplier=1.0,
            max_grad_norm=1.0, sample_rate=0.5, expected_batch_size=1.5,
        )  # fmt: skip
    text = " ".join(str(w.message) for w in caught)
    assert "per patient" in text and "per dataset item" not in text
    assert loader.num_units == 3 and engine.guarantee.unit == "patient"


def test_grouping_costs_no_more_clipping_work_than_rows():
    # A unit's norm is the norm of the sum of its rows (the cross-row terms included), not
    # the root of the sum of its rows' squared norms.
    lin = nn.Linear(3, 1, bias=False).double()
    with torch.no_grad():
        lin.weight.zero_()
    x = torch.tensor([[1.0, 0, 0], [1.0, 0, 0], [0, 1.0, 0]], dtype=torch.float64)

    class Pairs(Dataset):
        def __len__(self):
            return 2

        def __getitem__(self, i):
            return [(x[0],), (x[1],)] if i == 0 else [(x[2],)]

    pmodel, opt, loader = _quiet_make_private(
        dpseg.PrivacyEngine(), module=lin, optimizer=torch.optim.SGD(lin.parameters(), lr=1),
        data_loader=DataLoader(Pairs(), batch_size=2, collate_fn=flatten_collate),
        noise_multiplier=0.0, max_grad_norm=10.0, sample_rate=1.0, expected_batch_size=2,
        loss_reduction="sum",
    )  # fmt: skip
    (xb,) = next(iter(loader))
    pmodel(xb).sum().backward()
    opt.step()
    # Patient 0: rows (1,0,0) twice, mean (1,0,0): norm 1 (not sqrt(2)/2 nor sqrt 2).
    torch.testing.assert_close(
        opt.last_per_sample_norms, torch.tensor([1.0, 1.0], dtype=torch.float64)
    )
    assert math.isclose(float(lin.weight[0, 0]), -1.0)


def test_grouping_holds_through_a_torch_func_unit():
    # A module with a parameter beside its submodule is one torch.func unit (vmap of one vjp
    # per row); its per-row gradients are grouped afterwards like every rule's.
    class Owner(nn.Module):
        def __init__(self):
            super().__init__()
            self.scale = nn.Parameter(torch.full((1, 2, 1, 1, 1), 1.5))
            self.conv = nn.Conv3d(1, 2, 3, padding=1)

        def forward(self, x):
            return torch.tanh(self.conv(x)) * self.scale + self.scale**2

    counts = [2, 1, 3]
    x, y = _rows(sum(counts), seed=9)
    torch.manual_seed(0)
    model = Owner().double()
    oracle_model = copy.deepcopy(model)
    loader = DataLoader(MultiSample(x, y, counts), batch_size=3, collate_fn=flatten_collate)
    pmodel, opt, loader = _quiet_make_private(
        dpseg.PrivacyEngine(), module=model, optimizer=torch.optim.SGD(model.parameters(), lr=1.0),
        data_loader=loader, noise_multiplier=0.0, max_grad_norm=0.5, sample_rate=1.0,
        expected_batch_size=3,
    )  # fmt: skip
    xb, yb, rows = next(iter(loader))
    before = _flat(model)
    seg_loss_mean(pmodel(xb), yb).backward()
    opt.step()
    groups = _row_groups(rows, counts)
    _, expected = _expected_update(oracle_model, seg_loss_mean, x, y, groups, 0.5, 3, "mean")
    _assert_close(before - _flat(model), expected)


class _Cases(TensorDataset):
    """Items are MSD cases of which a subject may have several: the dataset says so."""

    privacy_unit = "case"

    @property
    def patient_ids(self):
        return list(range(len(self)))


def test_the_declared_unit_is_named_as_the_caller_or_the_dataset_says():
    x, y = _rows(6, seed=2)

    def make(data, **kw):
        model = SmallSegNet().double()
        engine = dpseg.PrivacyEngine(accountant="rdp")
        _quiet_make_private(
            engine, module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
            data_loader=DataLoader(data, batch_size=2), noise_multiplier=1.0,
            max_grad_norm=1.0, sample_rate=0.5, expected_batch_size=3, **kw,
        )  # fmt: skip
        return engine

    ids = [0, 0, 1, 1, 2, 2]
    assert make(TensorDataset(x, y), patient_ids=ids).guarantee.unit == "patient"
    named = make(TensorDataset(x, y), patient_ids=ids, privacy_unit="subject")
    assert named.get_privacy_spent(1e-5)["unit"] == "subject"
    assert named.state_dict()["unit"] == "subject"
    assert make(_Cases(x, y)).guarantee.unit == "case"
    assert make(_Cases(x, y), privacy_unit="subject").guarantee.unit == "subject"  # the call wins
    with pytest.raises(ValueError, match='not "item"'):
        make(TensorDataset(x, y), patient_ids=ids, privacy_unit="item")
    with pytest.raises(ValueError, match="give patient_ids too"):
        make(TensorDataset(x, y), privacy_unit="case")  # a name for undeclared rows
    # A ledger kept per patient does not become one per case on resume.
    resumed = dpseg.PrivacyEngine(accountant="rdp")
    kept = make(TensorDataset(x, y), patient_ids=ids)
    kept.accountant.step(noise_multiplier=1.0, sample_rate=0.5)
    resumed.load_state_dict(kept.state_dict())
    with pytest.raises(ValueError, match="kept per patient.*would account per case"):
        model = SmallSegNet().double()
        _quiet_make_private(
            resumed, module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
            data_loader=DataLoader(_Cases(x, y), batch_size=2), noise_multiplier=1.0,
            max_grad_norm=1.0, sample_rate=0.5, expected_batch_size=3,
        )  # fmt: skip
