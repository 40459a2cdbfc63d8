"""`--preset`: named option bundles, flags that override them, and the default a run without one gets."""

import pytest
from click.testing import CliRunner

from streamedit.accel import compile_cache
from streamedit.cli import cli
from streamedit.cli.commands import stylize
from streamedit.cli.options import COMPILE_COST_S, SAVED_S_PER_FRAME, auto_preset, preset_fields
from streamedit.config import EXACT, PRESETS
from streamedit.video.clips import make_test_clip

FAST = ["--model", "random:tiny", "--size", "64", "--batch", "4", "--device", "cpu"]


def _fields(*args):
    ctx = stylize.make_context("stylize", ["in.mp4", "-o", "o.mp4", "-p", "x", *args])
    p = ctx.params
    return ctx, dict(batch_size=p["batch"], compile=p["compile_"], compile_mode=p["compile_mode"], te_fast=p["te_fast"],
                     te_size=int(p["te_size"]), te_refresh_every=p["te_refresh"], main_priority=p["main_priority"],
                     cond_stagger=p["cond_stagger"], flow_size=p["flow_size"])


def test_a_preset_sets_what_the_command_line_did_not():
    ctx, fields = _fields("--no-compile", "--te-size", "256")
    got = preset_fields(ctx, "exact", fields)
    assert got["compile"] is False and got["te_size"] == 256  # given flags win, even a default value made explicit
    assert "compile_vae" not in got  # --no-compile: the VAE is not compiled either (None: as `compile`)
    assert all(got[k] == v for k, v in EXACT.items() if k not in ("compile", "compile_vae"))
    ctx, fields = _fields()
    assert {k: preset_fields(ctx, "max", fields)[k] for k in PRESETS["max"]} == PRESETS["max"]
    assert preset_fields(ctx, "eager", fields)["compile"] is False and not preset_fields(ctx, "eager", fields)["te_fast"]


def test_presets_are_engine_options():
    from dataclasses import fields

    from streamedit.config import EngineConfig

    names = {f.name for f in fields(EngineConfig)}
    assert all(set(p) <= names for p in PRESETS.values())
    assert PRESETS["paper"]["te_size"] == 256 and not PRESETS["paper"]["te_fast"] and PRESETS["paper"]["compile"]


def test_the_default_compiles_on_cuda_only_where_it_pays():
    assert auto_preset(False, 10_000, True)[0] == "eager"
    cold = int(COMPILE_COST_S["cold"] / SAVED_S_PER_FRAME)
    warm = int(COMPILE_COST_S["warm"] / SAVED_S_PER_FRAME)
    assert warm < 1000 < cold  # a 30 s clip compiles on a warm cache only
    name, why = auto_preset(True, cold - 10, False)
    assert name == "eager" and "cold compile cache" in why and "--preset exact" in why
    assert auto_preset(True, cold + 10, False)[0] == "exact"
    assert auto_preset(True, warm + 10, True)[0] == "exact" and auto_preset(True, warm - 10, True)[0] == "eager"
    assert auto_preset(True, None, False)[0] == "exact"  # length unknown (a stream): compile


def test_compile_cache_warmth_is_read_from_its_folder(tmp_path, monkeypatch):
    monkeypatch.setenv(compile_cache.ENV, str(tmp_path))
    assert not compile_cache.is_warm("k1")
    (tmp_path / "precompiled").mkdir()
    (tmp_path / "precompiled" / "k1-main-abc.bin").write_bytes(b"x")
    assert compile_cache.is_warm("k1") and not compile_cache.is_warm("k2")


@pytest.mark.timeout(300)
def test_stylize_says_which_preset_it_chose(tmp_path):
    src = make_test_clip(tmp_path / "in.mp4", frames=4, width=64, height=64)
    res = CliRunner().invoke(cli, ["stylize", str(src), "-o", str(tmp_path / "o.mp4"), "-p", "x", *FAST])
    assert res.exit_code == 0, res.output
    assert "preset: eager (on CPU)" in res.stderr
    res = CliRunner().invoke(cli, ["stylize", str(src), "-o", str(tmp_path / "o.mp4"), "-p", "x", *FAST,
                                   "--preset", "max", "--no-compile", "--no-te-fast"])  # nothing compiled on CPU
    assert res.exit_code == 0, res.output
    assert "preset: max (--preset)" in res.stderr


def test_low_latency_is_a_preset_and_conflicts_with_another():
    res = CliRunner().invoke(cli, ["stylize", "in.mp4", "-o", "o.mp4", "-p", "x", "--low-latency", "--preset", "exact"])
    assert res.exit_code == 2 and "--low-latency is --preset low-latency" in res.stderr
