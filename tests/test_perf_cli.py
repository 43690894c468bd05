"""The benchmark harness and the bench/profile commands, at toy sizes."""

import json

import pytest
import torch

from dpseg.cli import main
from dpseg.perf import StepBenchConfig, format_table, peak_memory_call, run_step_benchmark
from dpseg.perf.harness import Timing, cpu_peak_supported


def test_peak_memory_sees_a_freed_temporary():
    if not cpu_peak_supported():
        pytest.skip("no /proc/self/clear_refs here")
    size = 64 * 2**20

    def allocate():
        t = torch.ones(size // 4)  # touched, so resident
        del t

    assert peak_memory_call(allocate) >= 0.9 * size
    assert peak_memory_call(lambda: None) < 0.1 * size


def test_timing_quantiles():
    t = Timing.of([1.0, 2.0, 3.0, 4.0, 5.0])
    assert t.median_s == 3.0 and t.p20_s < t.median_s < t.p80_s


def test_step_benchmark_runs_every_engine_and_reports_ratios():
    cfg = StepBenchConfig(channels=(4, 8), size=8, batch=2, repeats=1, warmup=0)
    report = run_step_benchmark(cfg)
    by_engine = {r.engine: r for r in report.results}
    assert set(by_engine) == {"none", "dpseg", "opacus-hooks", "opacus-functorch"}
    for r in report.results:
        assert r.error is None, (r.engine, r.error)
        assert r.median_s > 0 and r.time_ratio > 0
    assert by_engine["none"].time_ratio == 1.0
    table = format_table(report)
    assert "opacus-hooks" in table and "time x" in table
    assert report.environment["torch"] == torch.__version__


def test_bench_cli_writes_results_and_reads_toml_config(tmp_path, capsys):
    config = tmp_path / "bench.toml"
    config.write_text(
        'size = 8\nchannels = [4, 8]\nengines = ["none", "dpseg"]\nrepeats = 1\nwarmup = 0\n'
    )
    assert main(["bench", "--config", str(config), "--out", str(tmp_path / "res")]) == 0
    latest = json.loads((tmp_path / "res" / "dp_step_cpu.json").read_text())
    assert [r["engine"] for r in latest[0]["results"]] == ["none", "dpseg"]
    assert (tmp_path / "res" / "history.jsonl").read_text().count("\n") == 1
    assert "dpseg" in capsys.readouterr().out


def test_cli_user_errors_exit_2_without_traceback(tmp_path, capsys):
    assert main(["bench", "--size", "9", "--channels", "4,8"]) == 2
    err = capsys.readouterr().err
    assert "divisible by 2" in err and "Traceback" not in err
    bad = tmp_path / "bad.toml"
    bad.write_text("sizee = 3\n")
    assert main(["bench", "--config", str(bad)]) == 2
    assert "unknown key" in capsys.readouterr().err


def test_profile_cli_writes_traces(tmp_path, capsys):
    out = tmp_path / "prof"
    assert (
        main(["profile", "--size", "8", "--channels", "4,8", "--steps", "1", "--out", str(out)])
        == 0
    )
    result = json.loads((out / "profile.json").read_text())
    ranges = result["engines"]["dpseg"]["ranges_ms"]
    assert any(k.startswith("dpseg::per_sample_weight_grad") for k in ranges)
    assert "dpseg::clip_accumulate_noise" in ranges
    assert (out / "trace_dpseg.json").stat().st_size > 0
    assert "extra" in capsys.readouterr().out


def test_step_benchmark_with_physical_batches(tmp_path, capsys):
    cfg = StepBenchConfig(
        channels=(4, 8), size=8, batch=5, physical_batch=2, repeats=1, warmup=0,
        engines=("none", "dpseg", "opacus-functorch"),
    )  # fmt: skip
    report = run_step_benchmark(cfg)
    for r in report.results:
        assert r.error is None, (r.engine, r.error)
        assert r.median_s > 0 and r.time_ratio > 0
    assert "in physical batches of 2" in format_table(report)
    assert main(["bench", "--physical-batch", "0", "--size", "8", "--channels", "4,8"]) == 2
    assert "--physical-batch must be >= 1" in capsys.readouterr().err
