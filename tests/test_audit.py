"""The empirical privacy audit: its statistics against independent oracles, the one-step
audit of the real DP step (the CI check), its power, the sabotages it must catch, and every
path (backends, BatchMemoryManager, Poisson over several steps)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from opacus.accountants import PRVAccountant
from scipy import stats

from dpseg import ops
from dpseg.audit import (
    AuditConfig,
    clopper_pearson_upper,
    epsilon_lower_bound,
    epsilon_of_gdp,
    log_likelihood_ratio,
    run_audit,
    trial_scores,
)
from dpseg.cli import main
from dpseg.privacy.optimizer import DPOptimizer
from tests import triton_env

DELTA = 1e-5
triton_device = triton_env.triton_device  # the module's device fixture


# --- statistics ---------------------------------------------------------------------------
@pytest.mark.parametrize("k,n", [(0, 10), (3, 10), (10, 10), (17, 100_000), (999, 1000)])
def test_clopper_pearson_upper_is_where_the_binomial_tail_equals_the_error(k, n):
    error = 0.025
    p = float(clopper_pearson_upper(np.array([k]), n, error)[0])
    if k == n:
        assert p == 1.0
        return
    # The exact upper bound: P(X <= k | p) = error (X ~ Binomial(n, p)).
    assert stats.binom.cdf(k, n, p) == pytest.approx(error, rel=1e-6)
    assert k / n < p <= 1


def test_gdp_epsilon_matches_the_accountant_for_one_gaussian_step():
    for sigma in (1.0, 2.0):
        acc = PRVAccountant()
        acc.step(noise_multiplier=sigma, sample_rate=1.0)
        # PRV discretises; the exact mu = 1/sigma curve is within its tolerance.
        assert epsilon_of_gdp(1 / sigma, DELTA) == pytest.approx(acc.get_epsilon(DELTA), abs=0.02)
    assert epsilon_of_gdp(0.0, DELTA) == 0.0


def test_log_likelihood_ratio_is_the_mixture_density_ratio():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(50, 3))
    sigma, q = 1.3, 0.2
    direct = np.log(
        ((1 - q) * stats.norm.pdf(x, 0, sigma) + q * stats.norm.pdf(x, 1, sigma))
        / stats.norm.pdf(x, 0, sigma)
    ).sum(axis=1)
    np.testing.assert_allclose(log_likelihood_ratio(x, sigma, q), direct, rtol=1e-10)
    np.testing.assert_allclose(
        log_likelihood_ratio(x, sigma, 1.0), ((x - 0.5) / sigma**2).sum(axis=1), rtol=1e-12
    )


def test_the_bound_holds_and_is_tight_on_exact_gaussian_trials():
    # Ideal mu-GDP trials: N(0,1) against N(mu,1), whose true epsilon is epsilon_of_gdp(mu).
    rng = np.random.default_rng(1)
    mu, n = 1.0, 400_000
    true = epsilon_of_gdp(mu, DELTA)
    bounds = []
    for seed in range(5):
        r = np.random.default_rng(seed)
        b = epsilon_lower_bound(r.normal(0, 1, n), r.normal(mu, 1, n), DELTA, rng=rng)
        bounds.append(b.epsilon)
    assert max(bounds) <= true
    assert min(bounds) >= 0.6 * true  # 2.6 of 4.38 at 4e5 trials a world
    # Identical worlds: nothing to find.
    r = np.random.default_rng(9)
    assert epsilon_lower_bound(r.normal(size=n), r.normal(size=n), DELTA).epsilon < 0.3


# --- the real DP step -----------------------------------------------------------------
def _claimed(sigma: float) -> float:
    acc = PRVAccountant()
    acc.step(noise_multiplier=sigma, sample_rate=1.0)
    return acc.get_epsilon(DELTA)


def test_one_step_audit_at_sigma_1_the_ci_check():
    # Fixed seed, Clopper-Pearson at 95%: fails if the step leaks more than the accountant
    # claims, or if the audit lost its power. 400,000 trials a world, ~10 s on 2 cores.
    r = run_audit(AuditConfig(noise_multiplier=1.0, trials=400_000, seed=0))
    assert r.epsilon_claimed == pytest.approx(_claimed(1.0)) == pytest.approx(4.39, abs=0.01)
    assert r.epsilon_lower <= r.epsilon_claimed
    assert r.epsilon_lower >= 0.5 * r.epsilon_claimed, r
    assert r.trials == 400_000 and r.evaluated_trials == [300_000, 300_000]


def test_without_noise_the_audit_finds_a_large_epsilon():
    r = run_audit(AuditConfig(noise_multiplier=0.0, trials=20_000, seed=1))
    assert r.epsilon_claimed is None
    assert r.epsilon_lower >= 5, r


def test_clipping_that_skips_the_canary_is_caught(monkeypatch):
    original = DPOptimizer._clip_factors

    def skip_big(self, grads, units):
        norms, factors = original(self, grads, units)
        unclipped = units.row_scale(self.loss_reduction)
        return norms, torch.where(norms > 2 * self.max_grad_norm, unclipped, factors)

    monkeypatch.setattr(DPOptimizer, "_clip_factors", skip_big)
    r = run_audit(AuditConfig(noise_multiplier=1.0, trials=20_000, seed=2))
    assert r.epsilon_lower > r.epsilon_claimed, r


def test_noise_at_half_its_std_is_caught(monkeypatch):
    original = DPOptimizer._noise_args

    def half(self):
        args = original(self)
        return {**args, "noise_std": args["noise_std"] / 2}

    monkeypatch.setattr(DPOptimizer, "_noise_args", half)
    # True epsilon ~10 at an effective sigma of 0.5; the claim stays 4.39.
    r = run_audit(AuditConfig(noise_multiplier=1.0, trials=200_000, seed=3))
    assert r.epsilon_lower > r.epsilon_claimed, r


def _backends() -> list[str]:
    return [b for b in ("torch", "cpp") if b in ops.available_backends()]


@pytest.mark.parametrize("backend", _backends())
def test_every_cpu_backend_passes(backend):
    r = run_audit(AuditConfig(noise_multiplier=1.0, trials=200_000, backend=backend, seed=4))
    assert 0.5 * r.epsilon_claimed <= r.epsilon_lower <= r.epsilon_claimed, r


def test_batch_memory_manager_path_passes():
    # The canaries spread over 4+ physical batches of each logical batch.
    r = run_audit(
        AuditConfig(noise_multiplier=1.0, trials=200_000, path="batch_memory_manager", seed=5)
    )
    assert 0.5 * r.epsilon_claimed <= r.epsilon_lower <= r.epsilon_claimed, r


def test_ddp_path_passes():
    # Two gloo processes, the canary model in DDP: each rank clips its share of the Poisson
    # draw, rank 0 adds the noise, one all-reduce. The released updates are the plain path's
    # (up to the order of the sum), so is the bound.
    r = run_audit(AuditConfig(noise_multiplier=1.0, trials=200_000, path="ddp", seed=4))
    plain = run_audit(AuditConfig(noise_multiplier=1.0, trials=200_000, seed=4))
    assert 0.5 * r.epsilon_claimed <= r.epsilon_lower <= r.epsilon_claimed, r
    assert r.epsilon_lower == pytest.approx(plain.epsilon_lower, abs=0.02)


def test_multi_step_poisson_audit_stays_under_the_accountant():
    cfg = AuditConfig(noise_multiplier=1.0, steps=4, sample_rate=0.25, trials=40_000, seed=7)
    r = run_audit(cfg)
    acc = PRVAccountant()
    for _ in range(4):
        acc.step(noise_multiplier=1.0, sample_rate=0.25)
    assert r.epsilon_claimed == pytest.approx(acc.get_epsilon(DELTA), rel=1e-9)
    assert 0 < r.epsilon_lower <= r.epsilon_claimed, r


# --- the command ------------------------------------------------------------------------
def test_audit_cli_writes_the_report(tmp_path, capsys):
    out = tmp_path / "audit"
    code = main(
        ["audit", "--noise-multiplier", "0,1", "--trials", "4000", "--slots", "1000",
         "--out", str(out)]
    )  # fmt: skip
    assert code == 0
    report = json.loads((out / "report.json").read_text())
    keys = {
        "noise_multiplier", "steps", "sample_rate", "delta", "trials", "confidence",
        "epsilon_claimed", "epsilon_lower", "backend", "path",
    }  # fmt: skip
    assert [a["noise_multiplier"] for a in report["audits"]] == [0.0, 1.0]
    for audit in report["audits"]:
        assert keys <= set(audit)
    assert report["audits"][0]["epsilon_claimed"] is None
    assert math.isclose(report["audits"][1]["epsilon_claimed"], 4.387, abs_tol=0.01)
    assert (out / "report.md").read_text().count("\n| 1 | 1 | 1 | auto | plain |") == 1
    assert (out / "epsilon.png").stat().st_size > 0
    assert "epsilon lower" in capsys.readouterr().out
    assert main(["audit", "--out", str(out), "--trials", "8"]) == 2  # never overwrites
    assert "already holds an audit" in capsys.readouterr().err


def test_audit_cli_exits_1_when_the_engine_leaks(tmp_path, monkeypatch, capsys):
    original = DPOptimizer._noise_args
    monkeypatch.setattr(
        DPOptimizer, "_noise_args", lambda self: {**original(self), "noise_std": 0.0}
    )
    code = main(
        ["audit", "--noise-multiplier", "1", "--trials", "4000", "--slots", "1000",
         "--out", str(tmp_path / "a")]
    )  # fmt: skip
    assert code == 1
    assert "does not give the guarantee it reports" in capsys.readouterr().err


def test_audit_cli_usage_errors(tmp_path, capsys):
    for argv, message in [
        (["--backend", "fortran"], "not available here"),
        (["--path", "sideways"], "use one of"),
        (["--sample-rate", "0"], "sample_rate must be in"),
        (["--slots", "7"], "slots must be an even number"),
    ]:
        assert main(["audit", "--out", str(tmp_path / "x"), *argv]) == 2
        assert message in capsys.readouterr().err


def test_triton_backend_releases_the_bits_of_the_torch_backend(triton_device):
    # Under the interpreter Triton runs in numpy, far too slowly for 10^5 trials. It draws
    # the same Philox noise and sums in the same order as the torch backend, so its released
    # updates, scores and bound are the torch audit's, which passes above at 2 x 10^5.
    small = dict(noise_multiplier=1.0, trials=64, slots=64, data_dims=8, ordinary=4, seed=6)
    small["device"] = triton_device
    s0_t, s1_t, claimed = trial_scores(AuditConfig(**small, backend="triton"))
    s0_r, s1_r, _ = trial_scores(AuditConfig(**small, backend="torch"))
    np.testing.assert_allclose(s0_t, s0_r, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(s1_t, s1_r, rtol=1e-6, atol=1e-6)
    assert claimed == pytest.approx(4.39, abs=0.01)


# --- the patient as the unit: canaries of k rows -----------------------------------------
@pytest.mark.parametrize(
    "layout,collate", [("multi-sample", "monai"), ("multi-sample", "dpseg"), ("patients", "dpseg")]
)
def test_a_patient_canary_of_four_rows_moves_its_slot_by_c_once(layout, collate):
    # Through the real loader: MONAI's list_data_collate (and dpseg's), or a declared
    # patient map. The four rows are averaged and clipped as one: the bound stays under the
    # claim of one unit.
    if collate == "monai":
        pytest.importorskip("monai")
    cfg = AuditConfig(
        noise_multiplier=1.0, trials=6000, slots=2000, rows_per_canary=4, canary_layout=layout,
        collate=collate, seed=4,
    )  # fmt: skip
    r = run_audit(cfg)
    assert r.epsilon_lower <= r.epsilon_claimed, r
    assert r.unit == ("patient" if layout == "patients" else "item")


@pytest.mark.parametrize("layout", ["multi-sample", "patients"])
def test_clipping_rows_apart_is_caught(monkeypatch, layout):
    # Test-only sabotage: the grouping switched off, each row clipped alone, so a canary
    # patient of 4 rows moves its slot by 4C while the accountant assumes C.
    from dpseg.privacy.units import RowUnits, UnitFeed

    monkeypatch.setattr(UnitFeed, "for_forward", lambda self, rows: RowUnits.identity(rows))
    cfg = AuditConfig(
        noise_multiplier=1.0, trials=6000, slots=2000, rows_per_canary=4, canary_layout=layout,
        seed=5,
    )  # fmt: skip
    r = run_audit(cfg)
    assert r.epsilon_lower > r.epsilon_claimed, r


# --- add/remove worlds: what surrounds the step -------------------------------------------
def test_add_remove_worlds_hold_with_declared_constants():
    from dpseg.audit.worlds import WorldsConfig, run_worlds_audit, verdict

    r = run_worlds_audit(WorldsConfig(noise_multiplier=3.0, runs=64, dims=300, seed=1))
    assert r.adjacency == "add/remove" and r.steps == {0: [10], 1: [10]}
    assert r.epsilon_lower <= r.epsilon_claimed and verdict(r) == "ok", r


def test_add_remove_worlds_catch_q_steps_and_divisor_derived_from_n(monkeypatch):
    # Test-only sabotage: the old behaviour, Opacus's N-derived q, steps and divisor while
    # the add/remove claim stands. N = 100 against 101 at batch 10: 10 steps against 11,
    # divisors 10 and 9; the energy of the released updates tells them apart.
    from dpseg.audit.worlds import WorldsConfig, run_worlds_audit
    from dpseg.privacy.sampling_plan import SamplingPlan

    monkeypatch.setattr(SamplingPlan, "adjacency", property(lambda self: "add/remove"))
    cfg = WorldsConfig(
        noise_multiplier=3.0, runs=64, dims=300, sample_rate=None, expected_batch_size=None,
        seed=2,
    )  # fmt: skip
    r = run_worlds_audit(cfg)
    assert r.steps == {0: [10], 1: [11]}
    assert r.epsilon_lower > r.epsilon_claimed, r
    assert r.best_score in ("energy", "-energy")


# --- tokens and windows: the transformer paths ---------------------------------------------
@pytest.mark.parametrize("structure", ["tokens", "windows"])
def test_token_and_window_canaries_stay_under_the_claim(structure):
    # The canary's gradient reaches the layer as 4 tokens of one row ((B, T, D)), or as two
    # windows of two tokens each a row of their own ((B x windows, 2, D), summed back per
    # sample through the unit map): clipped per sample either way.
    r = run_audit(AuditConfig(noise_multiplier=1.0, trials=8000, slots=2000, structure=structure))
    assert r.epsilon_lower <= r.epsilon_claimed, r


def test_per_window_clipping_is_caught(monkeypatch):
    # Test-only sabotage: each window its own unit, clipped alone; a canary sample of four
    # windows then moves its slot by 4C while the accountant assumes C.
    from dpseg.privacy.capture import ForwardPasses
    from dpseg.privacy.units import RowUnits

    def per_window(self, call_units):
        rows = call_units.rows if call_units is not None else self.batch
        windows = RowUnits.identity(rows)
        return self.id_for_call(), windows, windows

    monkeypatch.setattr(ForwardPasses, "pass_info", per_window)
    cfg = AuditConfig(
        noise_multiplier=1.0, trials=8000, slots=2000, structure="windows", tokens=8,
        magnitude=16.0, seed=6,
    )  # fmt: skip
    r = run_audit(cfg)
    assert r.epsilon_lower > r.epsilon_claimed, r
