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

from streamedit.cli.group import cli
from streamedit.video.clips import make_test_clip

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


def _x264_options(path) -> str:
    """The settings x264 records in its bitstream (an SEI message: 'x264 - core N ... options: cabac=1 ...')."""
    data = open(path, "rb").read()
    start = data.index(b"options: ")
    return data[start:data.index(b"\x00", start)].decode()


def test_stylize_encoder_preset_reaches_x264(tmp_path):
    src = make_test_clip(tmp_path / "in.mp4", frames=4, width=64, height=48)
    options = {}
    for preset in (None, "ultrafast"):
        out = tmp_path / f"{preset}.mp4"
        code, _, err = _run("stylize", str(src), "-o", str(out), "-p", "sketch", *FAST,
                            *(["--encoder-preset", preset] if preset else []))
        assert code == 0, err
        options[preset] = _x264_options(out)
    assert "cabac=1" in options[None] and " subme=2 " in options[None]  # veryfast, the default
    assert "cabac=0" in options["ultrafast"] and " subme=0 " in options["ultrafast"]
    code, _, err = _run("stylize", str(src), "-o", str(tmp_path / "x.mp4"), "-p", "sketch", *FAST,
                        "--encoder-preset", "warp9")
    assert code == 2 and "warp9" in err and "Traceback" not in err


@pytest.mark.parametrize("pix_fmt,size", [("gray", (64, 48)), ("yuva420p", (64, 48)), ("yuv420p10le", (64, 48)),
                                          ("yuv420p", (333, 257))])
def test_stylize_unusual_sources(tmp_path, pix_fmt, size):
    ext = ".mkv" if pix_fmt != "yuv420p" else ".mp4"
    src = make_test_clip(tmp_path / f"in{ext}", frames=5, width=size[0], height=size[1], pix_fmt=pix_fmt)
    code, _, err = _run("stylize", str(src), "-o", str(tmp_path / "out.mp4"), "-p", "sketch", *FAST)
    assert code == 0, err
    n, _, (w, h), _ = _frames(tmp_path / "out.mp4")
    assert n == 5 and abs(w - size[0]) <= 1 and abs(h - size[1]) <= 1
    # what changed on the way is said, once: alpha dropped, an odd side padded
    assert err.count("alpha channel (transparency, yuva420p) is dropped") == (pix_fmt == "yuva420p")
    odd = (w, h) != size
    assert err.count("has an odd side") == odd and (not odd or "333x257 has an odd side, which 4:2:0 video "
                                                              "cannot hold: written as 334x258" in err)


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
    assert "text-encoder features: prenorm: last decoder layer before the final norm" in out
    code, out, err = _run("info", "--model", "demo")  # trained on the normed output (its streamedit.json)
    assert code == 0, err
    assert "text-encoder features: normed: last decoder layer after the final norm" in out


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
    while time.time() < deadline and not any(p.stat().st_size > 2000 for p in tmp_path.glob(".o.mp4.*")):
        time.sleep(0.2)  # the encoder has flushed some frames (to the temporary file): processing is under way
    assert not out.exists()  # the output appears only once finalized
    assert proc.poll() is None, "the run ended before it could be interrupted"
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "interrupted:" in err and "Traceback" not in err
    saved = int(err.split("interrupted:")[1].split()[0])
    n = _frames(out)[0]
    assert 0 < n < 2000 and n == saved
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.mp4", "o.mp4"]  # no temporary file left


@pytest.mark.parametrize("size, message", [("0", "got 0"), ("-32", "got -32")])
def test_size_must_be_positive(tmp_path, size, message):
    good = make_test_clip(tmp_path / "ok.mp4", frames=2, width=64, height=64)
    code, _, err = _run("stylize", str(good), "-o", str(tmp_path / "o.mp4"), "-p", "x", *FAST, "--size", size)
    _one_clean_error(code, err)
    assert f"--size must be a positive number of pixels, {message}" in err and "multiple" not in err
    assert not (tmp_path / "o.mp4").exists()


def test_read_only_output_folder_is_exit_2(tmp_path):
    from test_io import read_only_folder

    good = make_test_clip(tmp_path / "ok.mp4", frames=2, width=64, height=64)
    with read_only_folder(tmp_path / "ro") as ro:
        code, _, err = _run("stylize", str(good), "-o", str(ro / "o.mp4"), "-p", "x", *FAST)
    _one_clean_error(code, err)
    assert f"error: cannot write in the output folder {ro}: " in err and "OSError" not in err


def _audio_tracks(src, dst, tracks):
    """``src`` remuxed into ``dst`` with its audio stream repeated ``tracks`` times."""
    with av.open(str(src)) as i, av.open(str(dst), "w") as o:
        v = o.add_stream_from_template(i.streams.video[0])
        a = [o.add_stream_from_template(i.streams.audio[0]) for _ in range(tracks)]
        for pkt in i.demux():
            if pkt.dts is None:
                continue
            outs = [v] if pkt.stream.type == "video" else a
            for stream in outs:
                pkt.stream = stream
                o.mux(pkt)
    return dst


def test_second_audio_track_dropped_is_said(tmp_path):
    one = make_test_clip(tmp_path / "one.mp4", frames=6, width=64, height=64, audio=True)
    two = _audio_tracks(one, tmp_path / "two.mkv", 2)
    with av.open(str(two)) as c:
        assert len(c.streams.audio) == 2
    code, _, err = _run("stylize", str(two), "-o", str(tmp_path / "o.mp4"), "-p", "x", *FAST)
    assert code == 0, err
    assert "the input has 2 audio tracks; only the first is kept" in err
    assert _frames(tmp_path / "o.mp4")[3] == 1
    code, _, err = _run("stylize", str(one), "-o", str(tmp_path / "o1.mp4"), "-p", "x", *FAST)
    assert code == 0 and "audio tracks" not in err


@pytest.mark.timeout(300)
def test_full_disk_keeps_the_old_output_and_exits_2(tmp_path):
    """A real write failure (the file-size limit: EFBIG, as a full disk gives ENOSPC) while replacing a
    good output: one plain line, exit 2, the old file untouched, no temporary file left."""
    import resource

    src = make_test_clip(tmp_path / "in.mp4", frames=200, width=64, height=64, pattern="noise")
    out = make_test_clip(tmp_path / "o.mp4", frames=3, width=64, height=64)
    before = out.read_bytes()
    # above the old output, below the new one (200 frames of a random model's texture: tens of kB)
    limit = len(before) + 4096

    def small_files():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails (EFBIG) instead
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    proc = subprocess.run([sys.executable, "-m", "streamedit.cli", "stylize", str(src), "-o", str(out), "-p", "x",
                           *FAST], capture_output=True, text=True, timeout=240, preexec_fn=small_files)
    assert len(before) < limit and src.stat().st_size > 2 * limit
    assert proc.returncode == 2, proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert lines[-1] == f"error: cannot write {out}: File too large (the existing file is left as it was)"
    assert "Traceback" not in proc.stderr and "OSError" not in proc.stderr
    assert out.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.mp4", "o.mp4"]


def _start_then_signal(tmp_path, sig, when):
    """Launch a real stylize (the demo model, adapter on: seconds to the first frame on a CPU) and send
    ``sig`` at ``when``: 'loading' (the output's temporary file exists: the model is being loaded) or a
    delay in seconds after launch (imports)."""
    src = make_test_clip(tmp_path / "in.mp4", frames=400, width=64, height=64)
    out = tmp_path / "o.mp4"
    cmd = [sys.executable, "-m", "streamedit.cli", "stylize", str(src), "-o", str(out), "-p", "oil painting",
           "--model", "demo", "--lllite", "demo", "--device", "cpu", "--batch", "8"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if when == "loading":
        deadline = time.time() + 120
        while time.time() < deadline and not list(tmp_path.glob(".o.mp4.*")) and proc.poll() is None:
            time.sleep(0.005)
        assert list(tmp_path.glob(".o.mp4.*")), "the run never got to loading the model"
    else:
        time.sleep(when)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    return proc.returncode, err, out


@pytest.mark.timeout(300)
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_signal_during_model_loading_is_one_true_line_and_130(tmp_path, sig):
    code, err, out = _start_then_signal(tmp_path, sig, "loading")
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code == 130 and "Traceback" not in err, err
    assert lines == [f"interrupted before the first stylized frame: nothing was written ({out} not created)"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.mp4"]


@pytest.mark.timeout(300)
@pytest.mark.parametrize("when", [0.3, 0.5, 0.8, 1.2])
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_signal_early_in_start_up_is_one_line_and_130(tmp_path, sig, when):
    """Sent while Python imports torch / diffusers / transformers: whatever it hit (transformers turns an
    interrupted lazy import into a ModuleNotFoundError), one line that is true."""
    code, err, out = _start_then_signal(tmp_path, sig, when)
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code == 130 and "Traceback" not in err, (code, err)
    assert len(lines) == 1 and lines[0].startswith("interrupted"), err
    if "saved to" in lines[0]:  # it got further than expected: the claim must still be true
        assert _frames(out)[0] == int(lines[0].split()[1])
    else:
        assert not out.exists()


_HOOK = """
import os, signal, sys
class Hook:
    def find_spec(self, name, path=None, target=None):
        if name == "torch":  # torch starts to import: note whether interrupts are held, then send one
            sys.meta_path.remove(self)
            print("held:", signal.SIGTERM in signal.pthread_sigmask(signal.SIG_BLOCK, []), flush=True)
            os.kill(os.getpid(), signal.SIGTERM)
        return None
sys.meta_path.insert(0, Hook())
sys.argv = ["streamedit", *sys.argv[1:]]
from streamedit.cli.group import main
main()
"""


@pytest.mark.parametrize("argv", [["info", "--help"], ["serve", "--help"]])
def test_interrupts_are_held_while_torch_imports(argv):
    """torch's import runs Python from C++: an interrupt raised there aborted the process (exit 134, about one
    in 100 SIGTERMs sent during start-up). The CLI imports torch with SIGINT/SIGTERM held back, so one sent
    meanwhile ends the command after the import, with the usual line and 130. (A lazy command's module, serve,
    imports torch before the group's callback.)"""
    proc = subprocess.run([sys.executable, "-c", _HOOK, *argv], capture_output=True, text=True, timeout=120)
    assert proc.stdout.splitlines()[0] == "held: True", (proc.stdout, proc.stderr)
    assert proc.returncode == 130 and [ln for ln in proc.stderr.splitlines() if ln.strip()] == ["interrupted"], \
        proc.stderr
