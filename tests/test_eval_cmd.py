"""`streamedit eval` on CPU with random:tiny: per-clip JSONL + summary, a corrupt clip skipped,
baseline deltas, drift windows and windows around cuts."""

import json

import numpy as np
import pytest
from click.testing import CliRunner

from streamedit.cli.group import _Group
from streamedit.eval.run import eval_command, ping_pong
from streamedit.video.clips import make_test_clip

TINY = ["--prompt", "oil painting", "--model", "random:tiny", "--device", "cpu", "--size", "64", "--batch", "4",
        "--set", "te_refresh_every=100"]


def invoke(*args):
    group = _Group("streamedit", commands={"eval": eval_command})
    return CliRunner().invoke(group, ["eval", *TINY, *args], catch_exceptions=False)


def read(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    d = tmp_path_factory.mktemp("clips")
    make_test_clip(d / "moving.mp4", frames=16, width=64, height=48)
    make_test_clip(d / "scene_cut.mkv", frames=16, width=64, height=64, pattern="cut", cut_at=8)
    (d / "broken.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(range(256)) * 8)  # header, then garbage
    (d / "notes.txt").write_text("not a clip: ignored")
    return d


@pytest.fixture(scope="module")
def first_run(clips, tmp_path_factory):
    out = tmp_path_factory.mktemp("run1")
    res = invoke("--clips", str(clips), "--out", str(out), "--max-frames", "12", "--cut-at", "8", "--detect-cuts",
                 "--window", "4", "--lpips-weights", str(out / "missing.pth"))
    return res, out


def test_per_clip_jsonl_and_summary_with_corrupt_clip_skipped(first_run):
    res, out = first_run
    assert res.exit_code == 0, res.output
    assert "skipped broken.mp4" in res.output
    recs = {r["clip"]: r for r in read(out / "metrics.jsonl")}
    assert set(recs) == {"moving.mp4", "scene_cut.mkv", "broken.mp4"}
    assert "error" in recs["broken.mp4"] and "metrics" not in recs["broken.mp4"]
    for name in ("moving.mp4", "scene_cut.mkv"):
        r = recs[name]
        assert r["frames"] == 12 and r["stylize_fps"] > 0
        m = r["metrics"]
        for key in ("warp_error", "warp_error_input", "sobel", "sobel_input", "hf_fft", "hf_fft_input"):
            assert np.isfinite(m[key]), key
        assert m["warp_error"] >= 0 and 0 <= m["hf_fft"] <= 1
        assert "file not found" in r["skipped_metrics"]["lpips"]  # --lpips-weights reached compute_all
        assert r["run"]["model"] == "random:tiny" and r["run"]["config"]["size"] == 64
    summary = (out / "summary.md").read_text()
    assert "| moving.mp4 | 12 |" in summary and "| scene_cut.mkv | 12 |" in summary
    assert "Skipped clips" in summary and "`broken.mp4`" in summary


def test_windows_before_and_after_cuts(first_run):
    _, out = first_run
    recs = {r["clip"]: r for r in read(out / "metrics.jsonl")}
    (cut,) = recs["scene_cut.mkv"]["cuts"]
    assert cut["at"] == 8 and cut["given"] and cut["detected"]  # the engine's detector finds the real cut
    assert cut["before"]["frames"] == [4, 8] and cut["after"]["frames"] == [8, 12]
    for side in ("before", "after"):
        assert all(np.isfinite(cut[side][k]) for k in ("warp_error", "sobel", "hf_fft"))
    (no_cut,) = recs["moving.mp4"]["cuts"]
    assert no_cut["given"] and not no_cut["detected"]  # smooth motion: nothing detected
    assert "## Around cuts" in (out / "summary.md").read_text()


def test_baseline_comparison_deltas(clips, first_run, tmp_path):
    _, base_dir = first_run
    res = invoke("--clips", str(clips), "--out", str(tmp_path), "--max-frames", "12", "--seed", "7",
                 "--baseline", str(base_dir / "metrics.jsonl"))
    assert res.exit_code == 0, res.output
    base = {r["clip"]: r["metrics"] for r in read(base_dir / "metrics.jsonl") if "metrics" in r}
    cur = {r["clip"]: r["metrics"] for r in read(tmp_path / "metrics.jsonl") if "metrics" in r}
    rows = read(tmp_path / "comparison.jsonl")
    per_clip = [c for c in rows if c["clip"] != "(mean)"]
    assert {c["clip"] for c in per_clip} == {"moving.mp4", "scene_cut.mkv"}
    for c in per_clip:
        assert c["baseline"] == pytest.approx(base[c["clip"]][c["metric"]])
        assert c["current"] == pytest.approx(cur[c["clip"]][c["metric"]])
        assert c["delta"] == pytest.approx(c["current"] - c["baseline"])
        if c["baseline"]:
            assert c["pct"] == pytest.approx(100 * c["delta"] / abs(c["baseline"]))
        assert c["same_input"]  # same clips, same frames: only the seed changed
    mean_sobel = next(c for c in rows if c["clip"] == "(mean)" and c["metric"] == "sobel")
    assert mean_sobel["current"] == pytest.approx(np.mean([m["sobel"] for m in cur.values()]))
    assert any(c["metric"] == "warp_error" and c["delta"] != 0 for c in per_clip)  # another seed, other outputs
    inputs = [c for c in per_clip if c["metric"] == "sobel_input"]
    assert all(c["delta"] == pytest.approx(0, abs=1e-12) for c in inputs)
    assert "## Versus baseline" in (tmp_path / "summary.md").read_text()


def test_drift_windows(clips, tmp_path):
    res = invoke("--clips", str(clips / "moving.mp4"), "--out", str(tmp_path), "--max-frames", "10", "--drift",
                 "--drift-frames", "48", "--window", "16")
    assert res.exit_code == 0, res.output
    (rec,) = read(tmp_path / "metrics.jsonl")
    assert rec["frames_decoded"] == 10 and rec["frames"] == 48
    for metric in ("warp_error", "sobel", "hf_fft"):
        d = rec["drift"][metric]
        assert d["starts"] == [0, 16, 32] and len(d["values"]) == 3
        assert d["std"] == pytest.approx(np.std(d["values"])) and d["mean"] == pytest.approx(np.mean(d["values"]))
    assert "## Drift" in (tmp_path / "summary.md").read_text()


def test_ping_pong_has_no_seam():
    assert ping_pong([0, 1, 2, 3], 10) == [0, 1, 2, 3, 2, 1, 0, 1, 2, 3]


def test_no_decodable_clip_is_an_error(clips, tmp_path):
    res = invoke("--clips", str(clips / "broken.mp4"), "--out", str(tmp_path))
    assert res.exit_code == 2
    assert "skipped broken.mp4" in res.output and "error: none of the 1 clip(s) could be evaluated" in res.output
    assert "error" in read(tmp_path / "metrics.jsonl")[0]


def test_missing_clips_folder(tmp_path):
    res = invoke("--clips", str(tmp_path / "nope"), "--out", str(tmp_path / "o"))
    assert res.exit_code == 2 and "no such file or folder" in res.output
