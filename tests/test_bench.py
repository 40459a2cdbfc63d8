"""`streamedit bench` on CPU with random:tiny: the simulated camera's pacing, the warm-up accounting,
field consistency, the matrix in one process (one model load) and the plot."""

import json
import threading
import time

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

import streamedit.bench.command as bench
import streamedit.bench.report as bench_report
from streamedit.bench.run import SimulatedSource
from streamedit.cli.group import _Group
from streamedit.video.clips import make_test_clip

# te_refresh_every keeps the (comparatively slow) TE out of all but the first batch: CPU time in CI
TINY = ["--model", "random:tiny", "--device", "cpu", "--size", "64", "--set", "te_refresh_every=100"]


def invoke(*args):
    group = _Group("streamedit", commands={"bench": bench.bench_command})  # the CLI's error handling
    return CliRunner().invoke(group, ["bench", *args], catch_exceptions=False)


def frames(n=4, size=16):
    return [np.full((size, size, 3), i, np.uint8) for i in range(n)]


def test_source_paces_frames_at_its_rate():
    src = SimulatedSource(frames(), count=61, fps=30)  # 2 s of camera
    t0 = time.perf_counter()
    got = [int(f[0, 0, 0]) for f in src]
    elapsed = time.perf_counter() - t0
    assert got == [i % 4 for i in range(61)]  # looped, in order
    assert elapsed >= 2.0 - 1e-3
    stamps = np.asarray(src.captured) - src.captured[0]
    assert np.all(np.diff(stamps) > 0)
    assert np.all(stamps >= np.arange(61) / 30 - 1e-3)  # never captured before its time


def test_source_as_fast_as_possible_and_stops_its_thread():
    src = SimulatedSource(frames(), count=1000, fps=0)
    t0 = time.perf_counter()
    assert len(list(src)) == 1000 and time.perf_counter() - t0 < 1.0
    paced = iter(SimulatedSource(frames(), count=1000, fps=50))
    next(paced)
    paced.close()  # consumer gone (engine error): the producer must end, not run on for 20 s
    time.sleep(0.2)
    assert not any(t.name == "streamedit-bench-source" for t in threading.enumerate())


def test_single_run_realtime_fields_and_plot(tmp_path):
    clip = make_test_clip(tmp_path / "clip.mp4", frames=10, width=64, height=48)
    out, png = tmp_path / "bench.jsonl", tmp_path / "bench.png"
    t0 = time.perf_counter()
    res = invoke(*TINY, "--batch", "4", "--frames", "21", "--source-fps", "10", "--clip", str(clip),
                 "--json", str(out), "--plot", str(png))
    elapsed = time.perf_counter() - t0
    assert res.exit_code == 0, res.output
    assert elapsed >= 2.0  # 21 frames at 10 fps: the last one is captured 2 s after the first
    assert "3 untimed batches before the source starts, then the first 1 batch(es) excluded" in res.output
    (row,) = [json.loads(line) for line in out.read_text().splitlines()]
    # 21 fed = 4 (warm-up batch) + 16 counted + 1 (partial tail, dropped)
    assert (row["frames_fed"], row["frames_out"], row["frames_counted"]) == (21, 21, 16)
    assert row["tail_frames_dropped"] == 1
    warm = row["warmup_batches"] * row["batch"]
    assert row["frames_counted"] == row["frames_fed"] - warm - row["tail_frames_dropped"]
    assert len(row["series"]["latency_ms"]) == 16 and len(row["series"]["t_done_s"]) == 6
    assert row["wall_s"] >= 2.0 and row["fps"] > 0
    lat, wall = row["latency_ms"], row["batch_wall_ms"]
    assert 0 <= lat["p50"] <= lat["p95"] <= lat["max"]
    assert min(row["series"]["latency_ms"]) >= 0
    assert 0 < wall["p50"] <= wall["p95"] <= wall["max"]
    # sustained fps is the counted frames over the span of their batch completions
    t = row["series"]["t_done_s"]
    assert row["fps"] == pytest.approx(16 / (t[4] - t[0]))
    # CUDA-only fields are absent, not faked
    assert row["peak_gpu_gib"] is None and row["matmul_peak_tflops"] is None and row["pct_of_peak"] is None
    assert row["component_ms_mean"] == {}
    assert row["flops_per_frame"] > 0 and row["tflops"] == pytest.approx(row["flops_per_frame"] * row["fps"] / 1e12)
    assert "FlopCounterMode" in row["flops_method"]
    assert row["ratio"] is None  # no reference row in a single run
    assert row["device"].startswith("cpu") and row["torch"] and row["date"]
    assert "--source-fps 10" in row["command"] and "--clip" in row["command"]
    # the plotted line is exactly the counted batches (their walls are the row's stats), not the partial last one
    warm, counted = bench_report.wall_series(row)
    drawn = row["series"]["batch_wall_ms"][counted]
    assert len(drawn) == 4 and counted.stop == len(row["series"]["t_done_s"]) - 1 and warm == slice(0, 1)
    assert np.median(drawn) == pytest.approx(wall["p50"]) and max(drawn) == pytest.approx(wall["max"])
    with Image.open(png) as img:
        img.verify()
    with Image.open(png) as img:
        assert img.format == "PNG" and img.size[0] > 300


def test_matrix_rows_share_one_model_and_one_table(tmp_path, monkeypatch):
    loads = []
    real_load = bench.load
    monkeypatch.setattr(bench, "load", lambda *a: loads.append(a) or real_load(*a))
    out = tmp_path / "m.jsonl"
    res = invoke(*TINY, "--batch", "4", "--frames", "12", "--source-fps", "0", "--rows",
                 "reference,no-side-stream,paper", "--set", "compile=False", "--cond-refresh", "1", "--json", str(out))
    assert res.exit_code == 0, res.output
    assert len(loads) == 1
    rows = {r["row"]: r for r in map(json.loads, out.read_text().splitlines())}
    assert list(rows) == ["reference-512", "no-side-stream", "paper"]  # "reference": the 0.1 name
    paper, ref = rows["paper"], rows["reference-512"]
    assert paper["ratio"] == 1.0 and paper["config"]["te_size"] == 256 and ref["config"]["te_size"] == 512
    for r in rows.values():
        assert r["ratio"] == pytest.approx(r["fps"] / paper["fps"])  # every ratio is against the paper's recipe
        assert r["config"]["compile"] is False  # --set wins over the rows' compile=True
    assert ref["config"]["pipeline"] and not rows["no-side-stream"]["config"]["pipeline"]
    assert ref["frames_counted"] == 8
    # the reference recipe carries the (random) adapter; refreshed every batch, its flow shows up
    assert ref["config"]["lllite"] == "random" and ref["cond_fraction"] == 1.0 and ref["cond_flops_per_refresh"] > 0
    assert "flow_cpu" in ref["component_ms_mean"] and "flow_cpu" in res.output
    # same work per frame whatever the schedule: FLOPs do not depend on pipelining
    assert rows["no-side-stream"]["flops_per_frame"] == pytest.approx(ref["flops_per_frame"])
    table = res.output[res.output.index("row "):]
    assert all(name in table for name in rows)


@pytest.mark.parametrize("args, message", [
    (["--rows", "reference,warp-speed"], "unknown --rows warp-speed"),
    (["--set", "warp=9"], "--set warp: EngineConfig has no such field"),
    (["--set", "nonsense"], "--set expects KEY=VALUE"),
    (["--batch", "8", "--frames", "10"], "leaves no batch after the 1 warm-up"),
    (["--matrix", "--compile"], "--compile is for a single run"),
    (["--json", "/no/such/dir/x.jsonl"], "output folder does not exist"),
    (["--startup-profile", "prof"], "--startup-profile needs --startup"),
    (["--size", "0"], "--size must be a positive number of pixels, got 0"),
    (["--size", "-32"], "--size must be a positive number of pixels, got -32"),
])
def test_mistakes_are_one_line_errors(args, message):
    res = invoke(*TINY, *args)
    assert res.exit_code == 2
    assert message in res.output and res.output.count("\n") == 1


def test_matrix_rows_are_named_overrides():
    names = [n for n, _ in bench.MATRIX]
    assert names[0] == "paper" and {"reference-512", "best", "best-te256", "no-side-stream", "B=1", "no-compile"} <= set(names)
    rows = dict(bench.MATRIX)  # the paper's recipe: its TE view, eager TE and VAE, compiled U-Net
    assert rows["paper"]["te_size"] == 256 and not rows["paper"]["te_fast"] and not rows["paper"]["compile_vae"]
    assert rows["reference-512"] == dict(rows["paper"], te_size=512) and rows["best-te256"]["te_size"] == 256
    assert [n for n, _ in bench.select_rows(True, "reference,best", False, None)] == ["reference-512", "best"]
    config, notes = bench.build_config({"prompt": "x", "batch_size": 8}, dict(bench.MATRIX)["B=1"],
                                       {"warp_drive": True})
    assert config.batch_size == 1 and config.compile and config.compile_mode == "reduce-overhead"
    assert notes == ["engine has no 'warp_drive': runs without it"]


def test_gpu_speed_script_commands_are_valid_bench_invocations(tmp_path):
    """scripts/gpu_speed.py (run by hand on a GPU): every part is a bench command line that parses, with known rows."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "scripts" / "gpu_speed.py"
    spec = importlib.util.spec_from_file_location("gpu_speed", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    for part in script.PARTS:
        cmd = script.command(part, 480, None, tmp_path / "x.jsonl")
        args = cmd[cmd.index("bench") + 1:]
        ctx = bench.bench_command.make_context("bench", list(args))
        names = ctx.params["rows"].split(",")
        assert [n for n, _ in bench.select_rows(True, ctx.params["rows"], False, "random")] == names  # known rows
        assert ctx.params["lllite"] == "random" and ctx.params["source_fps"] == 0 and ctx.params["count"] == 480
    assert {n for p in script.PARTS.values() for n in p[1].split(",")} >= {
        "paper", "reference-512", "best", "best-te256", "approx", "fp8", "low-latency", "similar"}


def test_a_row_that_cannot_keep_up_says_so_in_the_table(tmp_path):
    """Fed far faster than it runs, the row's table line and notes say it fell behind (not only the JSON)."""
    out = tmp_path / "k.jsonl"
    res = invoke(*TINY, "--batch", "4", "--frames", "12", "--source-fps", "5000", "--json", str(out))
    assert res.exit_code == 0, res.output
    (row,) = [json.loads(line) for line in out.read_text().splitlines()]
    assert row["keeps_up"] is False
    head, line = res.output[res.output.index("row "):].splitlines()[:2]
    assert "keeps up" in head and "NO (5000 fps source)" in line
    assert "[run] cannot keep up with the 5000 fps source" in res.output


def test_keeps_up_column_reads_the_rows():
    base = dict(batch=4, fps=30.0, ratio=None, batch_wall_ms=dict(p50=1.0, p95=1.0, max=1.0),
                latency_ms=dict(p50=1.0, p95=1.0), component_ms_mean={}, peak_gpu_gib=None, tflops=None,
                pct_of_peak=None, notes=[])
    rows = [dict(base, row="fast", keeps_up=True, source_fps=30.0),
            dict(base, row="slow", keeps_up=False, source_fps=60.0),
            dict(base, row="free", keeps_up=None, source_fps=0.0)]
    lines = bench_report.format_table(rows).splitlines()
    col = lines[0].index("keeps up")
    cells = [ln[col - 10:col + len("keeps up")].strip() for ln in lines[1:4]]
    assert cells[0].endswith("yes") and cells[1].endswith("NO (60 fps source)") and cells[2].endswith("—")


def test_default_size_follows_the_model_like_stylize(tmp_path):
    """No --size: the demo model works at its own 256 (models.working_size), not 512."""
    out = tmp_path / "d.jsonl"
    res = invoke("--model", "demo", "--device", "cpu", "--batch", "1", "--frames", "2", "--source-fps", "0",
                 "--set", "te_refresh_every=100", "--json", str(out))
    assert res.exit_code == 0, res.output
    (row,) = [json.loads(line) for line in out.read_text().splitlines()]
    assert row["config"]["size"] == 256 and "256x256" in res.output


def test_startup_report_explains_a_fallback():
    launch = dict(import_s=1.0, load_s=2.0, engine_s=3.0, first_frame_s=4.0, cache={})
    res = {"cold": dict(launch, precompiled_fallbacks={"te": "cannot precompile te: graph break"}),
           "warm": dict(launch, precompiled_fallbacks={"main (compiled again)": "saved artifact is stale"}),
           "cache_mib": 1.0}
    text = bench_report.format_startup(res)
    assert "cold: te not precompiled (traced by torch.compile): cannot precompile te: graph break" in text
    assert "warm: main (compiled again): saved artifact is stale" in text
