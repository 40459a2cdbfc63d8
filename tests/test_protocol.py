"""`streamedit eval protocol`: the split kept apart in code, the report's arithmetic and verdict, the command."""

import json

import pytest
from click.testing import CliRunner

from streamedit.cli.group import cli
from streamedit.errors import StreameditError
from streamedit.eval import protocol as P


def test_split_is_disjoint_and_the_test_seeds_are_reserved():
    assert not set(P.DAVIS_TRAIN) & set(P.DAVIS_TUNE)
    assert all(s in P.RESERVED_SEEDS for s in (*P.TEST_SEEDS, *P.CUT_SEEDS))
    assert not set(P.TEST_SEEDS) & set(P.CUT_SEEDS)
    P.check_training_seeds(range(64))
    with pytest.raises(StreameditError, match="reserved"):
        P.check_training_seeds(range(8990, 9010))


def _row(clip, style, refresh, warp_pct, kept):
    return {"clip": clip, "style": style, "refresh": refresh, "warp_pct": warp_pct, "sobel_kept_pct": kept}


def test_summary_means_and_verdict():
    rows = [_row(c, s, 8, w, k) for c, s, w, k in [
        ("a", "oil", -30, 92), ("b", "oil", -20, 90),       # oil: -25, 91
        ("a", "sketch", -16, 88), ("b", "sketch", -40, 94),  # sketch: -28, 91
    ]] + [_row("a", "oil", 1, -10, 99), _row("a", "sketch", 1, -12, 97)]
    s = P.summarize(rows)
    assert list(s) == [8, 1]
    assert s[8]["styles"]["oil"] == {"warp_pct": -25, "sobel_kept_pct": 91, "clips": 2}
    assert s[8]["mean_warp_pct"] == pytest.approx(-26.5) and s[8]["mean_sobel_kept_pct"] == pytest.approx(91)
    assert s[8]["worst_style"] == "oil" and s[8]["pass"]
    assert not s[1]["pass"] and not s[1]["checks"]["worst_style"]
    # one style at -14 % fails the per-style floor even with a good mean
    rows[1]["warp_pct"] = 2.0  # oil: -14
    rows[3]["warp_pct"] = -80.0
    s = P.summarize(rows)
    assert s[8]["checks"]["mean_warp"] and not s[8]["checks"]["worst_style"] and not s[8]["pass"]
    # Sobel under 90 % fails
    s = P.summarize([_row("a", "oil", 8, -40, 85)])
    assert not s[8]["checks"]["sobel"] and not s[8]["pass"]


def test_test_clips_are_generated_one_per_motion():
    clips = P.test_clips(4, 3, 32)
    assert [n for n, _ in clips] == ["synth-9001-pan", "synth-9002-zoom", "synth-9003-rotate", "synth-9004-mixed"]
    assert clips[0][1].shape == (3, 32, 32, 3)
    with pytest.raises(StreameditError):
        P.test_clips(9, 3, 32)


def _invoke(*args):
    return CliRunner().invoke(cli, ["eval", "protocol", *args])


def test_command_end_to_end(tmp_path):
    out = tmp_path / "p"
    res = _invoke("--model", "random:tiny", "--lllite", "random", "--size", "64", "--clips", "1", "--frames", "8",
                  "--cut-clips", "0", "-p", "oil painting", "--refresh", "8", "--refresh", "2", "--out", str(out))
    assert res.exit_code == 0, res.output
    rows = [json.loads(x) for x in (out / "rows.jsonl").read_text().splitlines()]
    assert [(r["clip"], r["style"], r["refresh"]) for r in rows] == [("synth-9001-pan", "oil painting", 8),
                                                                    ("synth-9001-pan", "oil painting", 2)]
    for r in rows:
        assert r["warp_off"] > 0 and r["sobel_off"] > 0 and r["run"]["set"] == "test"
        assert r["warp_pct"] == pytest.approx(100 * (r["warp_on"] / r["warp_off"] - 1))
    report = (out / "report.md").read_text()
    assert "Targets at refresh 8" in report and "streamedit eval protocol" in report
    assert json.loads((out / "summary.json").read_text())["summary"]["8"]["styles"]["oil painting"]["clips"] == 1


def test_plain_eval_still_runs_through_the_group(tmp_path):
    res = CliRunner().invoke(cli, ["eval", "--help"])
    assert res.exit_code == 0 and "--clips" in res.output


@pytest.mark.parametrize("args, msg", [
    (["--set", "tune"], "--clips-dir"),
    (["--set", "train", "--clips-dir", "/nonexistent"], "lacks"),
    (["--clips", "9"], "--clips must be"),
    (["--lllite", "/no/such.safetensors"], "does not exist"),
])
def test_bad_input_is_one_line(tmp_path, args, msg):
    res = _invoke("--model", "random:tiny", "--out", str(tmp_path / "o"), *args)
    assert res.exit_code == 2
    lines = res.output.strip().splitlines()
    assert len(lines) == 1 and msg in lines[0], res.output


def test_cut_rows_measure_each_window(monkeypatch):
    """measure_cut: PSNR of the adapter run against the no-adapter run over the windows before the cut, after
    it and its first 4 frames, cut refresh on and off (runs faked with known offsets per window)."""
    import math

    import numpy as np

    frames = np.random.default_rng(0).integers(20, 200, (P.CUT_AT + 30, 8, 8, 3), dtype=np.uint8)

    def fake_stylize(models, clip, style, *, lllite=None, cut_refresh=True, **kw):
        out = clip.astype(np.int16)
        if lllite is not None:
            out[:P.CUT_AT] += 2
            out[P.CUT_AT:P.CUT_AT + 4] += 4 if cut_refresh else 16
            out[P.CUT_AT + 4:] += 8 if cut_refresh else 16
        return out.astype(np.uint8)

    monkeypatch.setattr(P, "stylize", fake_stylize)
    rows = P.measure_cut(None, "c", frames, ["oil"], "adapter", {}, window=24)
    db = lambda d: 10 * math.log10(255**2 / d**2)  # noqa: E731
    on, off = rows
    assert on["cut_refresh"] and not off["cut_refresh"]
    assert on["psnr_before"] == pytest.approx(db(2)) and off["psnr_before"] == pytest.approx(db(2))
    assert on["psnr_first4"] == pytest.approx(db(4)) and off["psnr_first4"] == pytest.approx(db(16))
    assert on["psnr_after"] == pytest.approx((4 * db(4) + 20 * db(8)) / 24)
    assert off["psnr_after"] == pytest.approx(db(16))
