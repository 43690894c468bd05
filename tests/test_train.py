"""The training building blocks the federated simulator reuses: split, schedule, loaders,
local_train, evaluate, and atomic checkpoints."""

import copy

import numpy as np
import pytest
import torch

from dpseg.data import DataError
from dpseg.train import (
    TrainConfig,
    build_model,
    build_optimizer,
    evaluate,
    load_checkpoint,
    local_train,
    make_loader,
    privatize,
    save_checkpoint,
    split_cases,
)
from dpseg.train.loop import lr_at, predict_volume
from dpseg.train.losses import DiceCELoss
from dpseg.train.metrics import dice_per_class
from dpseg.train.postprocess import keep_largest_component


def _volumes(n=6, size=16, seed=0):
    rng = np.random.default_rng(seed)
    images, labels = [], []
    for _ in range(n):
        label = np.zeros((size,) * 3, np.uint8)
        a, b = rng.integers(2, 6, 3), rng.integers(9, 14, 3)
        label[a[0] : b[0], a[1] : b[1], a[2] : b[2]] = 1
        images.append((0.3 + 0.4 * label + rng.normal(0, 0.05, label.shape)).astype(np.float32))
        labels.append(label)
    return images, labels


CFG = dict(patch=16, batch=3, channels=(4, 8), seed=5, lr=3e-3)


def test_split_cases_is_seeded_disjoint_and_complete():
    train, val = split_cases(range(10), 0.2, seed=1)
    assert sorted(train + val) == list(range(10)) and len(val) == 2
    assert split_cases(range(10), 0.2, seed=1) == (train, val)
    assert split_cases(range(10), 0.0, seed=1) == (list(range(10)), [])
    with pytest.raises(ValueError, match="val-fraction"):
        split_cases([4], 0.2, seed=0)


def test_cosine_schedule_ends_low_and_constant_stays():
    cfg = TrainConfig(lr=1e-2, lr_schedule="cosine")
    assert lr_at(cfg, 0, 100) == pytest.approx(1e-2)
    assert lr_at(cfg, 100, 100) == pytest.approx(1e-2 / 20)
    assert lr_at(cfg, 30, 100) > lr_at(cfg, 60, 100)
    assert lr_at(TrainConfig(lr=1e-2), 60, 100) == 1e-2


def _fresh(dp=True, engine="dpseg"):
    cfg = TrainConfig(dp=dp, engine=engine, noise_multiplier=1.0, **CFG)
    images, labels = _volumes()
    model = build_model(cfg, 2)
    opt = build_optimizer(cfg, model.parameters())
    loader = make_loader(images, labels, cfg)
    model, opt, loader, privacy = privatize(cfg, model, opt, loader, 6, rng_seed=cfg.seed)
    return cfg, model, opt, loader, privacy


@pytest.mark.parametrize("dp", [True, False])
def test_local_train_is_a_function_of_seed_and_step(dp):
    """Steps 3..5 run from a copy of the state after step 2 give the same weights as a run
    that never stopped: the batch, patches and noise of a step depend on (seed, step) only."""
    cfg, model, opt, loader, privacy = _fresh(dp)
    seen = []
    losses = local_train(
        model,
        opt,
        loader,
        DiceCELoss(),
        2,
        seed=cfg.seed,
        on_step=lambda s, l, b: seen.append((s, b)),
    )
    assert [s for s, _ in seen] == [1, 2] and len(losses) == 2
    state = {k: v.clone() for k, v in model.state_dict().items()}
    opt_state = copy.deepcopy(opt.state_dict())  # the live state keeps changing
    local_train(model, opt, loader, DiceCELoss(), 3, seed=cfg.seed, start_step=2)

    cfg2, model2, opt2, loader2, _ = _fresh(dp)
    model2.load_state_dict(state)
    opt2.load_state_dict(opt_state)
    local_train(model2, opt2, loader2, DiceCELoss(), 3, seed=cfg.seed, start_step=2)
    for (k, a), b in zip(model.state_dict().items(), model2.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, msg=k)
    if dp:
        assert privacy.epsilon(1e-5) > 0 and len(privacy.ledger()["history"]) >= 1
    else:
        assert privacy.epsilon(1e-5) is None


def test_local_train_rereads_the_loader_past_an_epoch():
    cfg, model, opt, loader, _ = _fresh(dp=False)
    assert len(loader) == 2  # 6 cases / batch 3: q = 1/2, 2 steps an epoch
    losses = local_train(model, opt, loader, DiceCELoss(), 5, seed=0)
    assert len(losses) == 5


def test_evaluate_gives_per_case_dice_and_hd95():
    cfg, model, opt, loader, _ = _fresh(dp=False)
    images, labels = _volumes(2, seed=9)
    rows = evaluate(model, images, labels, cfg, 2, names=["a", "b"], hd95=True)
    assert [r["case"] for r in rows] == ["a", "b"]
    assert all(0.0 <= r["dice"] <= 1.0 and len(r["hd95_mm"]) == 1 for r in rows)
    # The same scores after keeping the largest component, computed from the same prediction.
    for row, image, label in zip(rows, images, labels, strict=True):
        scores = predict_volume(model, image, cfg.patch, cfg.spatial_dims, cfg.overlap, "cpu")
        kept = keep_largest_component(scores.argmax(0).numpy(), 2)
        expected = float(dice_per_class(kept, label, 2).mean())
        assert row["largest_component"]["dice"] == pytest.approx(expected, abs=1e-12)
        # The untrained model predicts many pieces, so keeping one changes the score.
        assert row["largest_component"]["dice"] != row["dice"]
        assert len(row["largest_component"]["hd95_mm"]) == 1


def test_checkpoint_is_atomic_and_validated(tmp_path):
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(path, {"step": 3, "model": {"w": torch.ones(2)}})
    ckpt = load_checkpoint(path)
    assert ckpt["step"] == 3 and "rng" in ckpt
    assert not list(tmp_path.glob(".*tmp*"))  # the temporary file was renamed away
    good = path.read_bytes()
    # A failed write (the target is now a folder we cannot replace) keeps the old file.
    blocker = tmp_path / "sub"
    blocker.write_text("a file where a folder should be")
    with pytest.raises(DataError, match="cannot be written"):
        save_checkpoint(blocker / "checkpoint.pt", {"step": 4})
    assert path.read_bytes() == good
    torch.save({"step": 1}, tmp_path / "foreign.pt")
    with pytest.raises(DataError, match="not a dpseg checkpoint"):
        load_checkpoint(tmp_path / "foreign.pt")
    with pytest.raises(DataError, match="not found"):
        load_checkpoint(tmp_path / "none.pt")
