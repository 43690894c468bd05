"""The federated demo's workload in miniature: 2-D slices, DP with its own learning rate,
Opacus timed over fewer rounds, the largest-component validation, and the closing
paragraph."""

import json

import numpy as np
import pytest
import torch
from scipy import ndimage

from dpseg.cli import main
from dpseg.federated import demo as demo_module
from dpseg.federated.runner import FederatedConfig, run_federation
from dpseg.federated.sitedata import phantom_sites
from dpseg.models import UNet
from dpseg.train.checkpoint import load_checkpoint

TINY = dict(
    phantoms=12, sites=2, size=16, spatial_dims=2, patch=16, channels=(4, 8), rounds=2,
    local_steps=2, batch_size=3, lr=3e-3, dp_lr=3e-2, target_epsilon=8.0, accountant="rdp",
    test_fraction=0.34, engines=("dpseg", "opacus", "none"), engine_rounds={"opacus": 1},
    eval_overlap=0.0,
)  # fmt: skip


def _dice(pred: np.ndarray, label: np.ndarray) -> float:
    a, b = pred == 1, label == 1
    denom = a.sum() + b.sum()
    return 1.0 if denom == 0 else 2.0 * (a & b).sum() / denom


def _largest(pred: np.ndarray) -> np.ndarray:
    labels, n = ndimage.label(pred == 1, structure=np.ones((3, 3, 3)))
    if n == 0:
        return pred
    sizes = np.bincount(labels.ravel())[1:]
    return (labels == 1 + int(np.argmax(sizes))).astype(pred.dtype)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    report = run_federation(FederatedConfig(**TINY, seed=1), out, progress=False, plots=False,
                            echo=lambda s: None)  # fmt: skip
    return out, report


def test_report_keys_timing_only_engine_and_epsilon(tiny_run):
    out, report = tiny_run
    assert report["rounds_done"] == {"dpseg": 2, "opacus": 1, "none": 2}
    assert report["timing_only"] == {"opacus": 1}
    assert report["pooled_dice"]["opacus"] is None and report["seconds_per_round"]["opacus"] > 0
    for e in ("dpseg", "none"):
        assert 0 <= report["pooled_dice"][e] <= 1
        assert 0 <= report["pooled_dice_largest_component"][e] <= 1
    assert report["max_epsilon"]["dpseg"] <= 8.0 + 1e-9
    assert report["config"]["spatial_dims"] == 2 and report["config"]["dp_lr"] == 3e-2
    for site in report["sites"].values():
        assert set(site["dice_largest_component"]) == {"dpseg", "opacus", "none"}
    # The DP engines' own learning rate reached their optimizers.
    rec = json.loads((out / "report.json").read_text())
    assert rec["penalty"]["opacus"]["final_dice"] is None


def _scores(out, engine: str) -> tuple[list[float], list[float]]:
    """Per held-out case, in site order: Dice of the engine's final model as predicted and
    with the largest component kept, recomputed here slice by slice (numpy, scipy)."""
    sites, k = phantom_sites(out / "phantoms", 12, 2, size=16, seed=1, test_fraction=0.34)
    model = UNet(2, 1, k, channels=(4, 8), norm="group", upsample="interp", seed=1)
    model.load_state_dict(load_checkpoint(out / f"checkpoint_{engine}.pt")["weights"], strict=False)
    model.eval()
    plain, kept = [], []
    with torch.no_grad():
        for s in sites:
            for image, label in zip(s.test_images, s.test_labels, strict=True):
                x = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))
                pred = np.stack(
                    [
                        model(x[None, None, :, :, z]).argmax(1)[0].numpy()
                        for z in range(x.shape[-1])
                    ],
                    axis=-1,
                )
                plain.append(_dice(pred, label))
                kept.append(_dice(_largest(pred), label))
    return plain, kept


def test_largest_component_validation_recomputed_independently(tiny_run):
    out, report = tiny_run
    plain, kept = _scores(out, "dpseg")
    assert report["pooled_dice"]["dpseg"] == pytest.approx(np.mean(plain), abs=1e-6)
    assert report["pooled_dice_largest_component"]["dpseg"] == pytest.approx(
        np.mean(kept), abs=1e-6
    )
    last = report["rounds"][-1]
    assert len(last["cases"]) == len(plain)


def test_paired_gap_against_none_recomputed_independently(tiny_run):
    out, report = tiny_run
    assert set(report["paired"]) == {"dpseg"}  # opacus ran for timing only
    ours, base = _scores(out, "dpseg"), _scores(out, "none")
    for column, key in ((0, "dice"), (1, "dice_largest_component")):
        d = np.array(ours[column]) - np.array(base[column])
        got = report["paired"]["dpseg"][key]
        assert report["paired"]["dpseg"]["round"] == 2
        assert got["cases"] == len(d) == 4
        assert got["gap"] == pytest.approx(d.mean(), abs=1e-6)
        assert got["se"] == pytest.approx(d.std(ddof=1) / np.sqrt(len(d)), abs=1e-6)
        assert got["ours_better"] == int((d > 0).sum())
        assert got["base_better"] == int((d < 0).sum())
    assert "Against non-private training, case by case" in (out / "report.md").read_text()


def test_story_says_what_was_measured(tiny_run):
    out, report = tiny_run
    text = demo_module.story(report, out)
    assert f"{report['pooled_dice']['dpseg']:.3f}" in text
    assert f"{report['pooled_dice']['none']:.3f}" in text
    assert f"epsilon {report['max_epsilon']['dpseg']:.2f} per hospital" in text
    assert "timed over 1 rounds" in text and str(out / "report.md") in text


def test_demo_command_in_miniature(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(demo_module, "DEMO", {**TINY})
    monkeypatch.setattr("dpseg.federated.cli.DEMO", {**TINY})
    assert main(["demo", "--out", str(tmp_path / "d"), "--rounds", "2", "--local-steps", "1"]) == 0
    out = capsys.readouterr().out
    assert out.count("[ dpseg] round") == 2 and out.count("[opacus] round") == 1
    assert "What happened: 2 hospitals" in out and "without privacy" in out
    assert "step/s" not in out  # no progress bars in a log


def test_a_site_alone_and_sparse_evaluation(tmp_path):
    cfg = FederatedConfig(
        **{**TINY, "engines": ("dpseg",), "engine_rounds": {}, "rounds": 3},
        train_sites=("site1",), eval_every=2, seed=2,
    )  # fmt: skip
    report = run_federation(cfg, tmp_path, progress=False, plots=False, echo=lambda s: None)
    rounds = report["rounds"]
    assert [r.get("pooled_dice") is not None for r in rounds] == [False, True, True]
    for r in rounds:
        assert r["sampled"] == ["site1"]
        assert r["sites"]["site0"]["status"] == "idle" and r["sites"]["site1"]["status"] == "ok"
    # The untrained site spent nothing; its held-out patients are scored all the same.
    assert report["sites"]["site0"]["epsilon"]["dpseg"] in (None, 0.0)
    assert report["sites"]["site1"]["epsilon"]["dpseg"] > 0
    assert report["sites"]["site0"]["dice"]["dpseg"] is not None


def test_cosine_schedule_over_rounds_reaches_every_engine(tmp_path, monkeypatch):
    from dpseg.federated.site import Site
    from dpseg.train.loop import cosine_scale

    seen = []
    fit = Site.fit

    def spy(self, weights, steps, config=None, on_step=None):
        update = fit(self, weights, steps, config, on_step)
        lrs = {g["lr"] for g in self.optimizer.param_groups}
        seen.append((self.config.engine, self.name, lrs))
        return update

    monkeypatch.setattr(Site, "fit", spy)
    cfg = FederatedConfig(
        **{**TINY, "engines": ("dpseg", "opacus", "none"), "engine_rounds": {}, "rounds": 3},
        lr_schedule="cosine", seed=2,
    )  # fmt: skip
    report = run_federation(cfg, tmp_path, progress=False, plots=False, echo=lambda s: None)
    assert report["rounds_done"] == {"dpseg": 3, "opacus": 3, "none": 3}
    for engine in ("dpseg", "opacus", "none"):
        ours = [lrs for e, name, lrs in seen if e == engine and name == "site0"]
        base = 3e-2 if engine != "none" else 3e-3  # TINY's dp_lr and lr
        assert ours == [{base * cosine_scale(r, 3)} for r in range(3)], engine
    # From lr at round 1 towards lr/20, which the cosine reaches as the last round ends.
    assert cosine_scale(0, 3) == 1.0 and cosine_scale(2, 3) == pytest.approx(0.2875)
    assert cosine_scale(3, 3) == pytest.approx(1 / 20)
    with pytest.raises(ValueError, match="--lr-schedule"):
        FederatedConfig(**TINY, lr_schedule="step").check()


def test_resume_settings_under_a_schedule():
    constant = FederatedConfig(**TINY)
    key = constant.resume_key()
    assert constant.resume_diff(key) == []
    assert FederatedConfig(**{**TINY, "rounds": 5}).resume_diff(key) == []  # rounds may grow
    cosine = FederatedConfig(**TINY, lr_schedule="cosine")
    assert cosine.resume_diff(key) == ["lr_schedule"]
    # Under cosine the rounds are the schedule's length: a changed number is refused.
    longer = FederatedConfig(**{**TINY, "rounds": 5}, lr_schedule="cosine")
    assert longer.resume_diff(cosine.resume_key()) == ["rounds"]
    # A checkpoint written before lr_schedule existed counts as the default, constant.
    old = {k: v for k, v in key.items() if k != "lr_schedule"}
    assert constant.resume_diff(old) == [] and cosine.resume_diff(old) == ["lr_schedule"]
