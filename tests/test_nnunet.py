"""DP nnU-Net (dpseg.nnunet): nnU-Net's own network and loss against the float64 per-case
oracle, the loss checks, the MSD import, and the pipeline a user runs (plan and preprocess,
DP training, resume, predict) end to end on a small synthetic dataset."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from dpseg.nnunet.requirement import nnunet_available

pytestmark = pytest.mark.skipif(
    not nnunet_available(), reason="nnU-Net is not installed (make nnunet)"
)

import dpseg  # noqa: E402
from dpseg.data import DataError, flatten_collate  # noqa: E402
from dpseg.privacy import CoupledLossError  # noqa: E402
from dpseg.privacy.units import RowUnits  # noqa: E402
from tests.oracle import dp_sum, per_unit_grads  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DPSEG = [sys.executable, "-m", "dpseg"]


def _network(deep_supervision=True):
    from dynamic_network_architectures.architectures.unet import PlainConvUNet

    # nnU-Net's 3d_fullres network as its planner builds it (InstanceNorm3d affine,
    # LeakyReLU in place, transposed convolutions up, deep supervision), only narrower
    return PlainConvUNet(
        1, 3, [4, 8, 16], torch.nn.Conv3d, 3, [1, 2, 2], 2, 3, 2, conv_bias=True,
        norm_op=torch.nn.InstanceNorm3d, norm_op_kwargs={"eps": 1e-5, "affine": True},
        nonlin=torch.nn.LeakyReLU, nonlin_kwargs={"inplace": True},
        deep_supervision=deep_supervision,
    )  # fmt: skip


def _loss(batch_dice=False, ignore_label=None):
    from nnunetv2.training.loss.compound_losses import DC_and_CE_loss
    from nnunetv2.training.loss.deep_supervision import DeepSupervisionWrapper
    from nnunetv2.training.loss.dice import MemoryEfficientSoftDiceLoss

    loss = DC_and_CE_loss(
        {"batch_dice": batch_dice, "smooth": 1e-5, "do_bg": False, "ddp": False}, {},
        weight_ce=1, weight_dice=1, ignore_label=ignore_label,
        dice_class=MemoryEfficientSoftDiceLoss,
    )  # fmt: skip
    weights = np.array([1, 0.5, 0.0])  # nnU-Net's: halves, the lowest resolution unused
    return DeepSupervisionWrapper(loss, weights / weights.sum())


def _targets(labels: torch.Tensor) -> list[torch.Tensor]:
    """(B, 1, 8, 8, 8) labels at the three deep-supervision scales (nearest), as nnU-Net's
    DownsampleSegForDSTransform hands them over."""
    return [labels, labels[..., ::2, ::2, ::2], labels[..., ::4, ::4, ::4]]


class _CasesOfPatches(Dataset):
    """Case i: a list of its k patches (x, [target per scale]), as dpseg.nnunet.cases gives."""

    def __init__(self, x, labels, k):
        self.x, self.targets, self.k = x, _targets(labels), k

    def __len__(self):
        return self.x.shape[0] // self.k

    def __getitem__(self, i):
        rows = range(i * self.k, (i + 1) * self.k)
        return [(self.x[r], [t[r] for t in self.targets]) for r in rows]


class _Rows:
    """Targets of a list of scales, indexed by rows, for the oracle."""

    def __init__(self, targets):
        self.targets = targets

    def __getitem__(self, rows):
        return [t[rows] for t in self.targets]


def _flat(model) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def test_per_case_gradients_of_nnunets_network_match_the_float64_oracle():
    torch.manual_seed(0)
    k, cases, C, expected = 3, 5, 1e-3, 3
    x = torch.randn(cases * k, 1, 8, 8, 8, dtype=torch.float64)
    labels = torch.randint(0, 3, (cases * k, 1, 8, 8, 8)).to(torch.int16)
    net = _network().double()
    oracle = copy.deepcopy(net)
    loss = _loss()
    engine = dpseg.PrivacyEngine(accountant="rdp")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pnet, opt, loader = engine.make_private(
            module=net, optimizer=torch.optim.SGD(net.parameters(), lr=1.0),
            data_loader=DataLoader(_CasesOfPatches(x, labels, k), batch_size=2,
                                   collate_fn=flatten_collate),
            noise_multiplier=0.0, max_grad_norm=C, sample_rate=0.6,
            expected_batch_size=expected, noise_seed=3,
        )  # fmt: skip
    checked = 0
    for xb, targets in loader:
        if xb.shape[0] == 0:
            continue
        before = _flat(net)
        opt.zero_grad()
        loss(pnet(xb), targets).backward()
        opt.step()
        groups = [list(range(i, i + k)) for i in range(0, xb.shape[0], k)]
        per_case = per_unit_grads(oracle, loss, xb, _Rows(targets), groups)
        norms, summed = dp_sum(per_case, C)
        torch.testing.assert_close(opt.last_per_sample_norms.double(), norms, rtol=1e-9, atol=0)
        assert (norms > C).all()  # every case clipped: the clip is exercised
        update = torch.cat([summed[n].flatten() for n, _ in oracle.named_parameters()])
        torch.testing.assert_close(before - _flat(net), update / expected, rtol=1e-9, atol=1e-15)
        with torch.no_grad():
            for p, q in zip(oracle.parameters(), net.parameters(), strict=True):
                p.copy_(q)
        checked += len(groups)
    assert checked >= 3


def test_the_trainers_loss_is_per_case_and_batch_dice_is_refused():
    from dpseg.nnunet.loss import check_case_loss, refuse_batch_dice

    torch.manual_seed(1)
    net = _network().double()
    x = torch.randn(4, 1, 8, 8, 8, dtype=torch.float64)
    labels = torch.randint(0, 3, (4, 1, 8, 8, 8)).to(torch.int16)
    units = RowUnits((2, 2))  # two cases of two patches
    with torch.no_grad():
        out = net(x)
    check_case_loss(_loss(), out, _targets(labels), units)  # nnU-Net's loss, batch Dice off
    with pytest.raises(CoupledLossError, match="batch_dice"):
        refuse_batch_dice(_loss(batch_dice=True))
    # an ignore label under cross-entropy's "mean" divides by the batch's labelled voxels
    labels[0, 0, :4] = 3
    with pytest.raises(CoupledLossError):
        check_case_loss(_loss(ignore_label=3), out, _targets(labels), units)


def test_settings_are_checked():
    from dpseg.nnunet.settings import DPSettings

    ok = dict(sample_rate=0.2, expected_cases=32, target_epsilon=8)
    DPSettings(**ok)
    for bad, match in [
        ({"sample_rate": 0}, "sample rate"),
        ({"expected_cases": 0}, "expected cases"),
        ({"patches_per_case": 0}, "patches per case"),
        ({"max_grad_norm": -1}, "clip"),
        ({"noise_multiplier": 1.0}, "exactly one"),
        ({"target_epsilon": None}, "exactly one"),
        ({"delta": 1}, "delta"),
    ]:
        with pytest.raises(ValueError, match=match):
            DPSettings(**{**ok, **bad})


def _tiny_msd(root: Path, n: int = 8) -> Path:
    import nibabel as nib

    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    rng = np.random.default_rng(0)
    training = []
    for i in range(n):
        shape = (20 + i % 3, 24, 18)
        z, y, x = np.meshgrid(*[np.arange(s) for s in shape], indexing="ij")
        c = np.array(shape) / 2 + rng.normal(0, 1.5, 3)
        r = np.sqrt((z - c[0]) ** 2 + (y - c[1]) ** 2 + (x - c[2]) ** 2)
        label = np.zeros(shape, np.uint8)
        label[r < 6] = 1
        label[(r < 6) & (x > c[2])] = 2
        image = (100 + 50 * label + rng.normal(0, 20, shape)).astype(np.float32)
        name = f"tiny_{i:03d}"
        nib.save(nib.Nifti1Image(image, np.eye(4)), root / "imagesTr" / f"{name}.nii.gz")
        nib.save(nib.Nifti1Image(label, np.eye(4)), root / "labelsTr" / f"{name}.nii.gz")
        training.append(
            {"image": f"./imagesTr/{name}.nii.gz", "label": f"./labelsTr/{name}.nii.gz"}
        )
    meta = {"name": "Tiny", "modality": {"0": "MRI"}, "numTraining": n, "training": training,
            "labels": {"0": "background", "1": "A", "2": "B"}}  # fmt: skip
    (root / "dataset.json").write_text(json.dumps(meta))
    return root


def test_msd_import_keeps_held_out_cases_out_of_training(tmp_path):
    from dpseg.nnunet.convert import msd_to_nnunet

    msd = _tiny_msd(tmp_path / "msd", 4)
    train, test = ["tiny_000", "tiny_002", "tiny_003"], ["tiny_001"]
    folder = msd_to_nnunet(msd, tmp_path / "raw", 7, train, test)
    assert folder.name == "Dataset007_Tiny"
    assert sorted(p.name for p in (folder / "imagesTr").iterdir()) == [
        f"{c}_0000.nii.gz" for c in train
    ]
    assert [p.name for p in (folder / "imagesTs").iterdir()] == ["tiny_001_0000.nii.gz"]
    meta = json.loads((folder / "dataset.json").read_text())
    assert meta["numTraining"] == 3 and meta["labels"] == {"background": 0, "A": 1, "B": 2}
    assert (folder / "imagesTr" / "tiny_000_0000.nii.gz").is_symlink()  # never copied
    # a re-import with another case list keeps none of the earlier links
    msd_to_nnunet(msd, tmp_path / "raw", 7, ["tiny_001", "tiny_002"], ["tiny_000", "tiny_003"])
    assert sorted(p.name for p in (folder / "imagesTr").iterdir()) == [
        "tiny_001_0000.nii.gz", "tiny_002_0000.nii.gz"
    ]  # fmt: skip
    with pytest.raises(DataError, match="both"):
        msd_to_nnunet(msd, tmp_path / "raw", 7, train, ["tiny_000"])
    with pytest.raises(DataError, match="no case"):
        msd_to_nnunet(msd, tmp_path / "raw", 7, ["nope"])


def _env(tmp_path: Path) -> dict:
    env = dict(os.environ)
    env.update(
        nnUNet_raw=str(tmp_path / "raw"), nnUNet_preprocessed=str(tmp_path / "pre"),
        nnUNet_results=str(tmp_path / "res"), nnUNet_n_proc_DA="0", OMP_NUM_THREADS="2",
        PYTHONPATH=str(ROOT),
    )  # fmt: skip
    return env


def _run(cmd, env, expect=0) -> str:
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900, cwd=ROOT)
    out = proc.stdout + proc.stderr
    assert proc.returncode == expect, out[-4000:]
    return out


def test_cli_says_what_is_missing(tmp_path):
    env = _env(tmp_path)
    out = _run([*DPSEG, "nnunet", "train", "1", "3d_fullres", "all"], env, expect=2)
    assert "--sample-rate Q and --expected-cases E" in out
    del env["nnUNet_results"]
    out = _run([*DPSEG, "nnunet", "train", "1", "3d_fullres", "all", "--no-dp"], env, expect=2)
    assert "set nnUNet_results" in out


@pytest.mark.slow
def test_plan_train_resume_predict_end_to_end(tmp_path):
    """The three commands of the README on a synthetic MSD set, DP at epsilon 8, then a
    resume that must keep (never reset) the ledger, then nnUNetv2_predict on held-out cases."""
    env = _env(tmp_path)
    msd = _tiny_msd(tmp_path / "msd", 8)
    split = tmp_path / "split.json"
    names = [f"tiny_{i:03d}" for i in range(8)]
    split.write_text(json.dumps({"lists": {"train": names[:6], "test": names[6:]}}))
    _run([*DPSEG, "nnunet", "import-msd", "--data", str(msd), "--id", "501", "--split",
          str(split)], env)  # fmt: skip
    _run(["nnUNetv2_plan_and_preprocess", "-d", "501", "-c", "3d_fullres", "-np", "1",
          "-npfp", "1"], {**env, "nnUNet_n_proc_DA": "1",
                          "PATH": f"{Path(sys.executable).parent}:{env['PATH']}"})  # fmt: skip
    train = [*DPSEG, "nnunet", "train", "501", "3d_fullres", "all", "--sample-rate", "0.5",
             "--expected-cases", "3", "--epochs", "2", "--iterations-per-epoch", "2",
             "--device", "cpu", "--threads", "2"]  # fmt: skip
    out = _run(train, env)
    fold = tmp_path / "res" / "Dataset501_Tiny" / "nnUNetTrainerDP__nnUNetPlans__3d_fullres"
    fold = fold / "fold_all"
    record = json.loads((fold / "privacy.json").read_text())
    assert record["unit"] == "case" and record["steps_accounted"] == 4
    assert 7.5 < record["epsilon"] <= 8.0  # sigma calibrated to spend 8 over 4 steps
    assert f"epsilon {record['epsilon']:.3f}" in out
    ckpt = torch.load(fold / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    assert [list(h) for h in ckpt["dpseg"]["ledger"]["history"]] == record["ledger"]["history"]
    assert ckpt["optimizer_state"]["dpseg"]["steps_taken"] == 4
    assert "noise_seed" not in ckpt["optimizer_state"]["dpseg"]  # the noise stays secret
    assert not (fold / "checkpoint_best.pth").exists()  # no validation, no "best"

    # resuming under other privacy settings is refused, with what to change
    out = _run([*train, "--c", "--max-grad-norm", "2"], env, expect=1)
    assert "other privacy settings (max_grad_norm)" in out
    # a model released at more steps than the checkpoint resumed (say checkpoint_best after
    # the last checkpoint_latest): the ledger keeps the larger, epsilon never goes back
    later = copy.deepcopy(record)
    later["ledger"]["history"] = [[h[0], h[1], h[2] + 2] for h in later["ledger"]["history"]]
    (fold / "privacy.json").write_text(json.dumps(later))
    out = _run([*train, "--c"], env)
    resumed = json.loads((fold / "privacy.json").read_text())
    assert resumed["steps_accounted"] == 6 and resumed["epsilon"] > record["epsilon"]
    after = torch.load(fold / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    # the noise counter is never behind the ledger (a seeded run would otherwise draw the
    # released steps' noise again); nnU-Net's own epoch counter keeps the schedule
    assert after["optimizer_state"]["dpseg"] == {"steps_taken": 6}
    assert "the ledger keeps the larger" in (out + "".join(
        p.read_text() for p in fold.glob("training_log_*.txt")))  # fmt: skip

    pred = tmp_path / "pred"
    held_out = tmp_path / "raw" / "Dataset501_Tiny" / "imagesTs"
    predict = ["-i", str(held_out), "-o", str(pred), "-d", "501", "-c", "3d_fullres", "-f"]
    _run(
        [*DPSEG, "nnunet", "predict", *predict, "all", "-device", "cpu", "-npp", "1", "-nps", "1"],
        env,
    )
    import nibabel as nib

    for case in names[6:]:
        seg = np.asarray(nib.load(pred / f"{case}.nii.gz").dataobj)
        image = nib.load(msd / "imagesTr" / f"{case}.nii.gz")
        assert seg.shape == image.shape and set(np.unique(seg)) <= {0, 1, 2}


def _bare_trainer(settings, network, loss):
    """nnUNetTrainerDP without nnU-Net's folders and plans: the attributes its DP step
    reads, so that train_step runs as in training on an in-memory dataset."""
    from types import SimpleNamespace

    from dpseg.nnunet.trainer import nnUNetTrainerDP

    t = nnUNetTrainerDP.__new__(nnUNetTrainerDP)
    t.device, t.network, t.loss, t.dp = torch.device("cpu"), network, loss, settings
    t.optimizer = torch.optim.SGD(network.parameters(), lr=1.0)
    t.num_epochs, t.num_iterations_per_epoch, t.num_input_channels = 1, 4, 1
    t.engine, t._resume, t.noise_multiplier = None, None, None
    t.physical_cases = settings.physical_cases
    t.print_to_log_file = lambda *args, **kwargs: None
    t.configuration_manager = SimpleNamespace(patch_size=[8, 8, 8])
    t.label_manager = SimpleNamespace(all_labels=[0, 1, 2], ignore_label=None, has_regions=False)
    return t


def test_the_trainers_step_matches_the_oracle_through_physical_batches():
    """train_step as nnU-Net calls it: a logical Poisson batch of cases cut into physical
    batches of one case, each case's k patches clipped as one, one update a step."""
    from dpseg.nnunet.settings import DPSettings

    torch.manual_seed(2)
    k, cases, C, expected = 2, 6, 1e-3, 3
    settings = DPSettings(
        sample_rate=0.5, expected_cases=expected, patches_per_case=k, max_grad_norm=C,
        noise_multiplier=1e-12, accountant="rdp", physical_cases=1,
    )  # fmt: skip
    x = torch.randn(cases * k, 1, 8, 8, 8, dtype=torch.float64)
    labels = torch.randint(0, 3, (cases * k, 1, 8, 8, 8)).to(torch.int16)
    net, loss = _network().double(), _loss()
    oracle = copy.deepcopy(net)
    trainer = _bare_trainer(settings, net, loss)
    trainer.check_loss_per_case()  # nnU-Net's loss, batch Dice off: passes
    loader = DataLoader(_CasesOfPatches(x, labels, k), batch_size=1, collate_fn=flatten_collate)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer._make_private(loader)
    physical, seen = trainer._physical, []

    def spy():
        for batch in physical:
            seen.append(batch)
            yield batch

    trainer._physical = spy()
    multi = 0
    for _ in range(4):
        before, seen[:] = _flat(net), []
        trainer.train_step(None)
        rows = [b for b in seen if b[0].shape[0]]
        multi += len(rows) > 1
        if not rows:  # an empty Poisson batch: noise only (sigma C / E ~ 3e-16 here)
            assert (before - _flat(net)).abs().max() < 1e-12
            continue
        xb = torch.cat([b[0] for b in rows])
        targets = [torch.cat([b[1][s] for b in rows]) for s in range(3)]
        groups = [list(range(i, i + k)) for i in range(0, xb.shape[0], k)]
        per_case = per_unit_grads(oracle, loss, xb, _Rows(targets), groups)
        _, summed = dp_sum(per_case, C)
        update = torch.cat([summed[n].flatten() for n, _ in oracle.named_parameters()])
        torch.testing.assert_close(before - _flat(net), update / expected, rtol=1e-7, atol=1e-13)
        with torch.no_grad():
            for p, q in zip(oracle.parameters(), net.parameters(), strict=True):
                p.copy_(q)
    assert multi >= 1  # a step made of several physical batches was checked
    assert trainer.optimizer.steps_taken == 4 and trainer.epsilon() > 0

    # a resumed branch keeps the step count and the ledger, and draws fresh noise: the
    # steps it runs again were released once with the old noise
    state = trainer.optimizer.state_dict()
    ledger = trainer.engine.state_dict()
    resumed = _bare_trainer(settings, copy.deepcopy(net), loss)
    resumed._resume = {"ledger": ledger, "noise_multiplier": trainer.noise_multiplier,
                       "optimizer_state": state}  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        resumed._make_private(loader)
    assert resumed.optimizer.steps_taken == 4
    assert resumed.optimizer.noise_seed != trainer.optimizer.noise_seed
    assert resumed.epsilon() == pytest.approx(trainer.epsilon())


def test_the_loss_check_before_training_refuses_a_coupled_loss():
    from dpseg.nnunet.settings import DPSettings

    settings = DPSettings(sample_rate=0.5, expected_cases=2, target_epsilon=8)
    trainer = _bare_trainer(settings, _network(), _loss(ignore_label=3))
    trainer.label_manager.ignore_label = 3  # an ignore label: CE's "mean" spans the batch
    with pytest.raises(CoupledLossError):
        trainer.check_loss_per_case()
