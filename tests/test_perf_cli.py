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


def test_steps_per_round_paces_every_engine_by_the_fastest():
    from dpseg.perf.dp_step import steps_per_round

    assert steps_per_round(0.0, [0.01, 0.02]) == 1  # off: one step a round
    assert steps_per_round(1.0, []) == 1  # no warm-up to pace by
    assert steps_per_round(1.0, [0.3, 0.1]) == 10  # the fastest engine sets the count
    assert steps_per_round(1.0, [2.5]) == 1


def test_round_seconds_times_the_same_number_of_steps_for_each_engine(monkeypatch, capsys):
    """Each timed sample is one round's time over its K steps, K the same for every engine
    and paced by the warm-up; the CLI reports K and refuses what it cannot pace."""
    import dpseg.perf.dp_step as dp_step
    from dpseg.perf.harness import Timing

    calls = {}

    def fake_make_step(engine, *args, **kwargs):
        calls[engine] = 0

        def step():
            calls[engine] += 1

        return step

    def fake_time_call(fn, repeats=1, warmup=0, device="cpu"):
        before = sum(calls.values())
        fn()
        return Timing.of([1e-3 * (sum(calls.values()) - before)])  # 1 ms a step

    monkeypatch.setattr(dp_step, "make_step", fake_make_step)
    monkeypatch.setattr(dp_step, "time_call", fake_time_call)
    cfg = StepBenchConfig(
        channels=(4, 8), size=8, batch=2, repeats=3, warmup=1, engines=("none", "dpseg"),
        round_seconds=0.01,
    )  # fmt: skip
    report = run_step_benchmark(cfg)
    assert report.config["steps_per_round"] == 10  # 10 ms of 1 ms steps
    # one warm-up step, 3 rounds of 10, one for the peak-memory reading
    assert calls == {"none": 32, "dpseg": 32}
    for r in report.results:
        assert r.samples_s == pytest.approx([1e-3] * 3)  # the round's time over its steps
    assert "over 3 rounds of 10 steps" in format_table(report)
    with pytest.raises(ValueError, match="warmup >= 1"):
        run_step_benchmark(StepBenchConfig(channels=(4, 8), size=8, warmup=0, round_seconds=1))
    for bad in (["--round-seconds", "-1"], ["--round-seconds", "nan"],
                ["--round-seconds", "1", "--warmup", "0"]):  # fmt: skip
        assert main(["bench", *bad, "--size", "8", "--channels", "4,8"]) == 2
        err = capsys.readouterr().err
        assert "--round-seconds" in err and "Traceback" not in err


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


def test_bench_step_on_the_users_network_reports_failing_engines_by_their_first_line():
    nets = pytest.importorskip("monai.networks.nets")
    from dpseg.perf import bench_step, example_batch

    model = nets.BasicUNet(3, 1, 2, features=(4, 4, 8, 8, 16, 4))
    x, y = example_batch(model, 2, 32)
    assert x.shape == (2, 1, 32, 32, 32) and y.shape == (2, 32, 32, 32) and y.max() <= 1
    report = bench_step(
        model, x, y, engines=("none", "dpseg", "opacus-hooks"), repeats=1, warmup=0, name="tiny"
    )
    by = {r.engine: r for r in report.results}
    assert by["dpseg"].error is None and by["dpseg"].time_ratio > 0
    # Opacus 1.6 crashes on BasicUNet's in-place activations: reported, not raised.
    assert by["opacus-hooks"].error.startswith("RuntimeError: Output 0 of BackwardHookFunction")
    assert "\n" not in by["opacus-hooks"].error
    table = format_table(report)
    assert "tiny" in table and "(2, 1, 32, 32, 32)" in table


def test_bench_cli_model_option(tmp_path, capsys):
    pytest.importorskip("monai")
    kwargs = '{"spatial_dims": 3, "in_channels": 1, "out_channels": 2, "init_filters": 4, "norm": ["GROUP", {"num_groups": 2}]}'  # noqa: E501
    argv = ["bench", "--model", "monai.networks.nets:SegResNet", "--model-kwargs", kwargs,
            "--size", "16", "--engines", "none,dpseg", "--repeats", "1", "--warmup", "0",
            "--out", str(tmp_path)]  # fmt: skip
    assert main(argv) == 0
    latest = json.loads((tmp_path / "dp_step_cpu.json").read_text())
    assert latest[0]["config"]["model"] == "monai.networks.nets:SegResNet"
    assert latest[0]["config"]["model_kwargs"]["init_filters"] == 4
    capsys.readouterr()
    for bad, message in [
        (["--model", "monai.networks.nets"], "must look like package.module:Callable"),
        (["--model", "nosuchpackage.x:Net"], "cannot import nosuchpackage.x"),
        (["--model", "monai.networks.nets:NoSuchNet"], "has no NoSuchNet"),
        (["--model", "monai.networks.nets:SegResNet", "--model-kwargs", "{oops"], "not valid JSON"),
        (["--model", "monai.networks.nets:SegResNet", "--model-kwargs", '{"bogus": 1}'], "bogus"),
    ]:
        assert main(["bench", *bad, "--out", str(tmp_path)]) == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err


def _profile_ranges(out):
    result = json.loads((out / "profile.json").read_text())
    for engine in ("none", "dpseg"):
        trace = json.loads((out / f"trace_{engine}.json").read_text())
        assert any(e.get("name") == f"step[{engine}]" for e in trace["traceEvents"])
    return result, result["engines"]["dpseg"]["ranges_ms"]


def test_profile_cli_on_a_monai_network(tmp_path, capsys):
    pytest.importorskip("monai")
    kwargs = '{"spatial_dims": 3, "in_channels": 1, "out_channels": 2, "init_filters": 4, "norm": ["GROUP", {"num_groups": 2}]}'  # noqa: E501
    out = tmp_path / "prof"
    argv = ["profile", "--model", "monai.networks.nets:SegResNet", "--model-kwargs", kwargs,
            "--size", "16", "--steps", "1", "--out", str(out)]  # fmt: skip
    assert main(argv) == 0
    result, ranges = _profile_ranges(out)
    assert result["config"]["model"] == "monai.networks.nets:SegResNet"
    assert result["config"]["model_kwargs"]["init_filters"] == 4
    assert result["config"]["input_shape"] == [2, 1, 16, 16, 16]
    # The engine's own ranges, on the user's layers.
    assert "dpseg::backward[Conv3d]" in ranges and "dpseg::backward[GroupNorm]" in ranges
    for name in ("dpseg::per_sample_norms", "dpseg::clip_accumulate_noise"):
        assert ranges[name] > 0
    assert result["step_ms"]["dpseg"] > 0 and result["step_ms"]["none"] > 0
    printed = capsys.readouterr().out
    assert "SegResNet" in printed and "(2, 1, 16, 16, 16)" in printed and "extra" in printed


def test_profile_cli_on_a_model_from_a_test_module(tmp_path, capsys):
    out = tmp_path / "prof"
    argv = ["profile", "--model", "tests.test_engine_oracle:SmallSegNet", "--size", "8",
            "--batch", "3", "--steps", "1", "--out", str(out)]  # fmt: skip
    assert main(argv) == 0
    result, ranges = _profile_ranges(out)
    assert result["config"]["input_shape"] == [3, 1, 8, 8, 8]
    for layer in ("Conv3d", "ConvTranspose3d", "GroupNorm", "InstanceNorm3d"):
        assert f"dpseg::backward[{layer}]" in ranges
    assert "dpseg::clip_accumulate_noise" in ranges
    assert "SmallSegNet" in capsys.readouterr().out


def test_profile_cli_model_errors_are_the_bench_ones(tmp_path, capsys):
    for bad, message in [
        (["--model", "tests.test_engine_oracle"], "must look like package.module:Callable"),
        (["--model", "tests.test_engine_oracle:NoSuchNet"], "has no NoSuchNet"),
        (["--model", "tests.test_engine_oracle:SmallSegNet", "--model-kwargs", "[1]"],
         "must be a JSON object"),
        (["--model", "tests.test_engine_oracle:SmallSegNet", "--model-kwargs", '{"w": 1}'],
         "unexpected keyword argument 'w'"),
        (["--model", "tests.test_engine_oracle:SmallSegNet", "--spatial-dims", "2"],
         "did not run on a (2, 1, 8^2) input"),
    ]:  # fmt: skip
        argv = ["profile", *bad, "--size", "8", "--steps", "1", "--out", str(tmp_path)]
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err
