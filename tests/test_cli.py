"""`streamedit stylize` / `info` end to end: outputs, every bad-input path, and interruption."""

import os
import signal
import subprocess
import sys
import time

import av
import pytest
import torch
from click.testing import CliRunner

from streamedit.cli import cli
from streamedit.clips import make_test_clip

FAST = ["--model", "random:tiny", "--size", "64", "--batch", "4", "--device", "cpu"]


def _run(*args):
    result = CliRunner().invoke(cli, list(args))
    return result.exit_code, result.stdout, result.stderr


def _frames(path):
    with av.open(str(path)) as c:
        s = c.streams.video[0]
        return sum(1 for _ in c.decode(s)), s.average_rate, (s.codec_context.width, s.codec_context.height), \
            len(c.streams.audio)


def _one_clean_error(code, err):
    assert code == 2
    lines = [ln for ln in err.strip().splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in err


def test_stylize_keeps_frames_fps_size_audio(tmp_path):
    src = make_test_clip(tmp_path / "in.mp4", frames=10, width=80, height=48, fps=25, audio=True)
    code, out, err = _run("stylize", str(src), "-o", str(tmp_path / "out.mp4"), "-p", "oil painting", *FAST)
    assert code == 0, err
    assert "10 frames in" in out
    n, fps, size, audio = _frames(tmp_path / "out.mp4")
    assert (n, fps, size, audio) == (10, 25, (80, 48), 1)


@pytest.mark.parametrize("pix_fmt,size", [("gray", (64, 48)), ("yuva420p", (64, 48)), ("yuv420p10le", (64, 48)),
                                          ("yuv420p", (333, 257))])
def test_stylize_unusual_sources(tmp_path, pix_fmt, size):
    ext = ".mkv" if pix_fmt != "yuv420p" else ".mp4"
    src = make_test_clip(tmp_path / f"in{ext}", frames=5, width=size[0], height=size[1], pix_fmt=pix_fmt)
    code, _, err = _run("stylize", str(src), "-o", str(tmp_path / "out.mp4"), "-p", "sketch", *FAST)
    assert code == 0, err
    n, _, (w, h), _ = _frames(tmp_path / "out.mp4")
    assert n == 5 and abs(w - size[0]) <= 1 and abs(h - size[1]) <= 1


def test_te_size_option(tmp_path):
    src = make_test_clip(tmp_path / "in.mp4", frames=4, width=64, height=64)
    args = ("stylize", str(src), "-o", str(tmp_path / "out.mp4"), "-p", "sketch", *FAST, "--te-size")
    code, out, err = _run(*args, "256")
    assert code == 0 and "4 frames in" in out, err
    code, _, err = _run(*args, "300")
    assert code == 2 and "--te-size" in err and "Traceback" not in err


def test_bad_inputs_give_one_line_and_exit_2(tmp_path):
    good = make_test_clip(tmp_path / "ok.mp4", frames=4, width=64, height=64)
    text = tmp_path / "notes.txt"
    text.write_text("not a video")
    out = str(tmp_path / "o.mp4")
    cases = [
        ("stylize", str(tmp_path / "missing.mp4"), "-o", out, "-p", "x", *FAST),
        ("stylize", str(text), "-o", out, "-p", "x", *FAST),
        ("stylize", str(good), "-o", out, "-p", "   ", *FAST),
        ("stylize", str(good), "-o", str(tmp_path / "no" / "such" / "dir" / "o.mp4"), "-p", "x", *FAST),
        ("stylize", str(good), "-o", out, "-p", "x", *FAST[:-2], "--device", "cuda"),
        ("stylize", str(good), "-o", out, "-p", "x", "--model", "nowhere/none-such-model", "--device", "cpu"),
        ("stylize", str(good), "-o", out, "-p", "x", "--model", str(tmp_path), "--device", "cpu"),
        ("stylize", str(good), "-o", out, "-p", "x", *FAST, "--lllite", str(tmp_path / "none.safetensors")),
        ("stylize", str(good), "-o", out, "-p", "x", *FAST, "--steps", "7"),
    ]
    if torch.cuda.is_available():
        cases.pop(4)
    for args in cases:
        code, _, err = _run(*args)
        _one_clean_error(code, err)


def test_zero_frame_video(tmp_path):
    path = tmp_path / "empty.mp4"
    with av.open(str(path), "w") as c:
        c.add_stream("libx264", rate=24).pix_fmt = "yuv420p"
    code, _, err = _run("stylize", str(path), "-o", str(tmp_path / "o.mp4"), "-p", "x", *FAST)
    _one_clean_error(code, err)


def test_corrupt_midway_keeps_decoded_frames(tmp_path):
    src = make_test_clip(tmp_path / "in.mkv", frames=48, width=64, height=64)
    data = src.read_bytes()
    cut = tmp_path / "cut.mkv"
    cut.write_bytes(data[: len(data) // 2])
    code, out, err = _run("stylize", str(cut), "-o", str(tmp_path / "o.mp4"), "-p", "x", *FAST)
    _one_clean_error(code, err)
    n = _frames(tmp_path / "o.mp4")[0]
    assert 0 < n < 48 and f"{n} frames in" in out


def test_long_prompt_is_truncated_with_a_warning(tmp_path):
    src = make_test_clip(tmp_path / "in.mp4", frames=4, width=64, height=64)
    code, _, err = _run("stylize", str(src), "-o", str(tmp_path / "o.mp4"), "-p", "x" * 5000, *FAST)
    assert code == 0 and "truncated" in err


def test_info_prints_the_feature_convention():
    code, out, err = _run("info", "--model", "random:tiny")
    assert code == 0, err
    assert "text-encoder features: last decoder layer before the final norm" in out


def test_info_real_builds_on_meta():
    code, out, err = _run("info", "--model", "random:real")
    assert code == 0, err
    assert "2.128 B" in out and "0.390 B" in out and "108 (down 38 / mid 16 / up 54)" in out


@pytest.mark.timeout(300)
def test_sigterm_leaves_playable_file_with_every_processed_frame(tmp_path):
    src = make_test_clip(tmp_path / "in.mp4", frames=2000, width=64, height=64)
    out = tmp_path / "o.mp4"
    # 4 steps at batch 1: slow enough that the run is surely still going when the signal comes
    cmd = [sys.executable, "-m", "streamedit.cli", "stylize", str(src), "-o", str(out), "-p", "x", *FAST,
           "--steps", "4", "--batch", "1"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, PYTHONUNBUFFERED="1"))
    deadline = time.time() + 120
    while time.time() < deadline and not (out.exists() and out.stat().st_size > 2000):
        time.sleep(0.2)  # the encoder has flushed some frames: processing is under way
    assert proc.poll() is None, "the run ended before it could be interrupted"
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "interrupted:" in err and "Traceback" not in err
    saved = int(err.split("interrupted:")[1].split()[0])
    n = _frames(out)[0]
    assert 0 < n < 2000 and n == saved
