"""Tests for streamedit.video.io: decoding, encoding, timestamps, audio, bad input and interruption."""

import contextlib
import errno
import os
import signal
import subprocess
import sys
import textwrap
from fractions import Fraction

import av
import numpy as np
import pytest

from streamedit.errors import StreameditError
from streamedit.video.clips import make_test_clip, write_clip
from streamedit.video.io import VideoWriter, open_video


def probe(path):
    """(video frame times in seconds, (width, height), audio seconds or None) of a file, by decoding it all."""
    with av.open(str(path)) as c:
        v = c.streams.video[0]
        times = [float(f.pts * f.time_base) for f in c.decode(v)]
        size = (v.codec_context.width, v.codec_context.height)
        audio = None
        if c.streams.audio:
            c.seek(0)
            a = c.streams.audio[0]
            audio = sum(f.samples for f in c.decode(a)) / a.rate
    return times, size, audio


def stylize(src, out, n=None, **kw):
    """Copy src to out through the working size, like the CLI does (optionally only n frames)."""
    with VideoWriter(out, src, **kw) as w:
        for i, frame in enumerate(src.frames()):
            if i == n:
                break
            w.write(255 - frame)
    return out


def test_round_trip_keeps_count_fps_timestamps_and_audio(tmp_path):
    inp = make_test_clip(tmp_path / "in.mp4", frames=30, width=96, height=64, fps=24, audio=True)
    src = open_video(inp, size=32)
    assert (src.info.width, src.info.height, src.info.fps) == (96, 64, Fraction(24))
    assert src.info.frame_count == 30 and src.info.has_audio and src.warning is None
    frames = list(src.frames())
    assert len(frames) == 30 and all(f.shape == (32, 32, 3) and f.dtype == np.uint8 for f in frames)

    out = stylize(open_video(inp, size=32), tmp_path / "out.mp4")
    t_in, _, a_in = probe(inp)
    t_out, size, a_out = probe(out)
    assert size == (96, 64)
    assert t_out == pytest.approx(t_in, abs=1e-3)
    assert open_video(out).info.fps == Fraction(24)
    assert a_out == pytest.approx(a_in, abs=0.03)  # copied, not dropped or cut
    with av.open(str(out)) as c:
        assert c.streams.audio[0].codec_context.name == "aac"


def test_output_content_is_the_written_frames(tmp_path):
    inp = make_test_clip(tmp_path / "in.mp4", frames=8, width=64, height=64)
    src = open_video(inp, size=64)
    originals = list(src.frames())
    out = stylize(open_video(inp, size=64), tmp_path / "out.mkv")
    decoded = list(open_video(out, size=64).frames())
    err = [np.abs(d.astype(int) - (255 - o.astype(int))).mean() for d, o in zip(decoded, originals)]
    assert len(decoded) == 8 and max(err) < 6, err  # inverted colours survive encode/decode


def test_background_conversion_encodes_the_same_frames(tmp_path, monkeypatch):
    """workers > 0 (frames scaled and converted on threads, encoded in order) hands the encoder exactly the
    frames and timestamps the synchronous writer does, and the files agree in frame times, size and audio
    (x264 itself is not bit-deterministic between runs); a buffer the caller reuses after write() does not
    leak into earlier frames; an interrupted job (close after some frames) keeps every frame written."""
    inp = make_test_clip(tmp_path / "in.mp4", frames=24, width=96, height=64, fps=24, audio=True)
    seen = {}
    encode = VideoWriter._encode

    def spy(self, frame, pts):
        seen.setdefault(self.path.name, []).append((pts, frame.format.name, bytes(frame.planes[0]), bytes(frame.planes[1])))
        return encode(self, frame, pts)

    monkeypatch.setattr(VideoWriter, "_encode", spy)
    for workers in (0, 3):
        name = f"w{workers}.mp4"
        seen[name] = []
        src, buf = open_video(inp, size=32), np.empty((32, 32, 3), np.uint8)
        with VideoWriter(tmp_path / name, src, workers=workers) as w:
            for frame in src.frames():
                np.subtract(255, frame, out=buf)  # one buffer for every frame, as an engine's host copy can be
                w.write(buf)
            assert w.frames_written <= 24
        assert w.frames_written == 24
    assert len(seen["w0.mp4"]) == 24 and seen["w0.mp4"] == seen["w3.mp4"]
    assert seen["w3.mp4"][0][2] != seen["w3.mp4"][-1][2]  # frames differ: the reused buffer did not leak
    assert probe(tmp_path / "w0.mp4") == probe(tmp_path / "w3.mp4")
    src = open_video(inp, size=32)
    with VideoWriter(tmp_path / "cut.mp4", src, workers=3) as w:
        for i, frame in enumerate(src.frames()):
            if i == 10:
                break
            w.write(frame)
    assert len(probe(tmp_path / "cut.mp4")[0]) == 10


def test_shrink_in_one_swscale_pass_matches_convert_then_cv2_area(tmp_path):
    """The reader shrinks a decoded frame to the working size and converts it to RGB in one swscale pass (area
    filter; a third of the CPU at 1080p). Against the old path (the whole frame to RGB, then cv2 INTER_AREA):
    within three levels on average (2.2 at most seen: the chroma is scaled in 4:2:0, not in RGB); the one-pass
    output is also no blurrier (gradient energy)."""
    from streamedit.video.geometry import fit

    inp = make_test_clip(tmp_path / "in.mp4", frames=6, width=192, height=128)
    whole = list(open_video(inp).frames())
    fast = list(open_video(inp, size=96).frames())
    assert len(fast) == 6 and fast[0].shape == (64, 96, 3)
    grad = lambda im: np.abs(np.diff(im.astype(int), axis=1)).mean()  # noqa: E731
    for got, full in zip(fast, whole):
        want = fit(full, (64, 96))
        assert np.abs(got.astype(int) - want.astype(int)).mean() < 3.0
        assert grad(got) > 0.9 * grad(want)


def test_upscale_in_one_swscale_pass_matches_cv2_then_convert(tmp_path):
    """The writer scales a smaller result up to the output size and converts it to 4:2:0 in one swscale pass
    (a tenth of the CPU at 1080p). Against the old path (cv2 bicubic in RGB, then BT.709 limited conversion):
    every plane within one level on average (bicubic kernels differ a little at hard edges; a wrong matrix,
    BT.601, is ~4 levels off in chroma); a result at the output size is converted as before, to the bit."""
    from streamedit.video.geometry import fit
    from streamedit.video.writer import _to_av_frame

    inp = make_test_clip(tmp_path / "in.mp4", frames=4, width=96, height=64)
    planes = lambda f: [np.frombuffer(bytes(p), np.uint8).astype(int) for p in f.planes]  # noqa: E731
    with VideoWriter(tmp_path / "o.mp4", fps=24, size=(96, 64)) as w:
        for small, same in zip(open_video(inp, size=48).frames(), open_video(inp, size=96).frames()):
            assert small.shape == (32, 48, 3) and same.shape == (64, 96, 3)
            for got, want in zip(planes(w._convert(small)), planes(_to_av_frame(fit(small, (64, 96)), "yuv420p"))):
                assert np.abs(got - want).mean() < 1.0
            for got, want in zip(planes(w._convert(same)), planes(_to_av_frame(same, "yuv420p"))):
                assert np.array_equal(got, want)
            w.write(small)


def test_x264_frame_threads_encode_the_same_pictures_as_slice_threads(tmp_path):
    """The writer asks x264 for frame threads (several frames in flight; slice threads split each frame and
    scale poorly at 1080p). Lossless, both decode to the same pictures at the same times, and a file cut
    short (close after some frames) still holds every frame written: the frames in flight are flushed."""
    inp = make_test_clip(tmp_path / "in.mp4", frames=20, width=96, height=64, fps=24)
    decoded = {}
    for frame_threads in (True, False):
        out = tmp_path / f"{frame_threads}.mkv"
        src = open_video(inp, size=64)
        with VideoWriter(out, src, crf=0, workers=0, frame_threads=frame_threads) as w:
            want = "FRAME" if frame_threads else "SLICE"
            assert w._stream.codec_context.thread_type.name == want
            for i, frame in enumerate(src.frames()):
                if i == 15:
                    break
                w.write(frame)
        with av.open(str(out)) as c:
            decoded[frame_threads] = [(f.pts, f.to_ndarray(format="yuv420p").tobytes()) for f in c.decode(video=0)]
    assert len(decoded[True]) == 15 and decoded[True] == decoded[False]


def test_variable_frame_rate_timestamps_preserved(tmp_path):
    inp = tmp_path / "vfr.mkv"
    pts = [0, 40, 80, 200, 240, 500, 540, 580]  # ms, irregular gaps
    with av.open(str(inp), "w") as c:
        s = c.add_stream("libx264", rate=25)
        s.width, s.height, s.pix_fmt = 64, 48, "yuv420p"
        s.codec_context.time_base = Fraction(1, 1000)
        for i, p in enumerate(pts):
            f = av.VideoFrame.from_ndarray(np.full((48, 64, 3), i * 30, np.uint8), format="rgb24")
            f.pts, f.time_base = p, Fraction(1, 1000)
            c.mux(s.encode(f))
        c.mux(s.encode())
    src = open_video(inp, size=32)
    out = stylize(src, tmp_path / "out.mp4")
    assert src.pts == pts
    assert probe(out)[0] == pytest.approx([p / 1000 for p in pts], abs=1e-3)


def test_odd_size_and_keep_size(tmp_path):
    inp = make_test_clip(tmp_path / "odd.mkv", frames=6, width=333, height=257)
    src = open_video(inp, size=64)
    assert (src.info.width, src.info.height) == (333, 257)
    times, size, _ = probe(stylize(src, tmp_path / "out.mp4"))
    assert len(times) == 6 and size == (334, 258)  # padded to even for yuv420p, see io docstring

    src = open_video(inp, size=64, keep_size=True)
    times, size, _ = probe(stylize(src, tmp_path / "small.mp4"))
    assert len(times) == 6 and size == (64, 64)


@pytest.mark.parametrize("name,pix_fmt", [("gray.mkv", "gray"), ("alpha.mkv", "yuva420p"),
                                          ("ten.mp4", "yuv420p10le"), ("rgba.mov", "rgba")])
def test_unusual_pixel_formats_decode_to_rgb8(tmp_path, name, pix_fmt):
    inp = make_test_clip(tmp_path / name, frames=5, width=64, height=48, pix_fmt=pix_fmt)
    src = open_video(inp, size=32)
    assert src.info.pix_fmt == pix_fmt  # the file really is in that format
    frames = list(src.frames())
    assert len(frames) == 5 and all(f.shape == (32, 32, 3) and f.dtype == np.uint8 for f in frames)
    assert frames[0].std() > 10  # real picture, not a blank conversion
    if pix_fmt == "gray":
        assert np.array_equal(frames[0][..., 0], frames[0][..., 1])
    assert len(probe(stylize(open_video(inp, size=32), tmp_path / "out.mp4"))[0]) == 5


def test_webm_output_transcodes_audio(tmp_path):
    inp = make_test_clip(tmp_path / "in.mp4", frames=24, audio=True)
    out = stylize(open_video(inp, size=32), tmp_path / "out.webm")
    times, _, audio = probe(out)
    assert len(times) == 24 and audio == pytest.approx(1.0, abs=0.06)
    with av.open(str(out)) as c:
        assert c.streams.video[0].codec_context.name == "vp9"
        assert c.streams.audio[0].codec_context.name in ("opus", "libopus")


def test_patterns_and_write_clip(tmp_path):
    static = list(open_video(make_test_clip(tmp_path / "s.mp4", frames=4, pattern="static"), size=48).frames())
    moving = list(open_video(make_test_clip(tmp_path / "m.mp4", frames=4), size=48).frames())
    cut = list(open_video(make_test_clip(tmp_path / "c.mp4", frames=8, pattern="cut", cut_at=5), size=48).frames())
    diff = lambda a, b: np.abs(a.astype(int) - b.astype(int)).mean()
    assert diff(static[0], static[3]) < 2 < diff(moving[0], moving[3])
    steps = [diff(cut[i], cut[i + 1]) for i in range(7)]
    assert int(np.argmax(steps)) == 4 and steps[4] > 3 * max(steps[:4] + steps[5:])
    noise = list(open_video(make_test_clip(tmp_path / "n.mkv", frames=3, pattern="noise"), size=None).frames())
    assert noise[0].std() > 40

    frames = [np.full((40, 60, 3), v, np.uint8) for v in (0, 128, 255)]
    times, size, _ = probe(write_clip(tmp_path / "w.mp4", frames, fps=10))
    assert times == pytest.approx([0, 0.1, 0.2]) and size == (60, 40)


def test_bad_input_raises_one_line_error(tmp_path):
    (tmp_path / "notes.mp4").write_text("just some text\n" * 20)
    (tmp_path / "empty.mp4").write_bytes(b"")
    for path, words in [(tmp_path / "missing.mp4", "not found"), (tmp_path / "notes.mp4", "not a readable video"),
                        (tmp_path / "empty.mp4", "empty"), (tmp_path, "directory")]:
        with pytest.raises(StreameditError, match=words) as e:
            open_video(path)
        assert "\n" not in str(e.value)


def test_audio_only_and_zero_frame_files_are_rejected(tmp_path):
    silence = np.zeros((1, 1024), np.float32)
    for name, with_video in [("audio.m4a", False), ("novideo.mkv", True)]:
        with av.open(str(tmp_path / name), "w") as c:
            if with_video:  # a video track that never gets a frame
                v = c.add_stream("libx264", rate=24)
                v.width, v.height, v.pix_fmt = 64, 48, "yuv420p"
            a = c.add_stream("aac", rate=48000, layout="mono")
            for i in range(10):
                f = av.AudioFrame.from_ndarray(silence, format="fltp", layout="mono")
                f.sample_rate, f.pts = 48000, i * 1024
                c.mux(a.encode(f))
            c.mux(a.encode())
    with pytest.raises(StreameditError, match="no video stream.*audio-only"):
        open_video(tmp_path / "audio.m4a")
    with pytest.raises(StreameditError, match="no decodable video frames"):
        open_video(tmp_path / "novideo.mkv")


@pytest.mark.parametrize("ext", [".mp4", ".mkv"])
def test_truncated_file_keeps_decoded_frames_and_warns(tmp_path, ext):
    inp = make_test_clip(tmp_path / f"full{ext}", frames=48, pattern="noise")  # noise: frames have similar sizes
    data = inp.read_bytes()
    cut = tmp_path / f"cut{ext}"
    cut.write_bytes(data[: len(data) * 6 // 10])
    src = open_video(cut, size=32)
    frames = list(src.frames())
    assert 10 < len(frames) < 48
    assert src.warning and "\n" not in src.warning
    # What was decoded can still be written out.
    assert len(probe(stylize(open_video(cut, size=32), tmp_path / "out.mp4"))[0]) == len(frames)
    # A healthy file gives no warning.
    src = open_video(inp, size=32)
    assert len(list(src.frames())) == 48 and src.warning is None


def test_read_ahead_gives_the_same_frames_and_stops_with_its_consumer(tmp_path):
    """frames(ahead=N) decodes on a thread: the same frames, timestamps and end-of-file state as frames();
    a truncated file's warning still arrives; a consumer that stops early stops the thread and closes the
    decoder's generator; an error in the producer is raised in the consumer."""
    import threading

    from streamedit.video.io import read_ahead

    inp = make_test_clip(tmp_path / "in.mp4", frames=40, width=64, height=48, pattern="noise")
    plain, ahead = open_video(inp, size=32), open_video(inp, size=32)
    a, b = list(plain.frames()), list(ahead.frames(ahead=3))
    assert len(a) == 40 and all(np.array_equal(x, y) for x, y in zip(a, b))
    assert plain.pts == ahead.pts and ahead.exhausted and ahead.warning is None
    data = inp.read_bytes()
    (tmp_path / "cut.mp4").write_bytes(data[: len(data) * 6 // 10])
    cut_plain, cut_ahead = open_video(tmp_path / "cut.mp4", size=32), open_video(tmp_path / "cut.mp4", size=32)
    assert len(list(cut_plain.frames())) == len(list(cut_ahead.frames(ahead=3))) < 40
    assert cut_ahead.warning == cut_plain.warning and cut_ahead.warning

    closed = []

    def numbers():
        try:
            yield from range(10**9)
        finally:
            closed.append(threading.current_thread().name)

    gen = read_ahead(numbers(), 4)
    assert [next(gen) for _ in range(5)] == [0, 1, 2, 3, 4]
    gen.close()
    assert closed == ["streamedit-reader"]
    assert not any(t.name == "streamedit-reader" for t in threading.enumerate())

    def broken():
        yield 1
        raise ValueError("bad packet")

    got = []
    with pytest.raises(ValueError, match="bad packet"):
        for item in read_ahead(broken(), 2):
            got.append(item)
    assert got == [1]


@contextlib.contextmanager
def read_only_folder(path):
    """A folder nobody may create files in: mode 0o500, or for root (who ignores modes) immutable."""
    path.mkdir(mode=0o500)
    if os.geteuid() == 0 and subprocess.run(["chattr", "+i", str(path)], capture_output=True).returncode:
        pytest.skip("running as root on a file system without chattr +i: no read-only folder to test")
    try:
        yield path
    finally:
        if os.geteuid() == 0:
            subprocess.run(["chattr", "-i", str(path)], capture_output=True)
        path.chmod(0o700)


def test_unwritable_output_raises_before_processing(tmp_path):
    src = open_video(make_test_clip(tmp_path / "in.mp4", frames=3), size=32)
    for bad in [tmp_path / "no" / "such" / "dir" / "out.mp4", tmp_path / "out.xyz", tmp_path, src.path]:
        with pytest.raises(StreameditError):
            VideoWriter(bad, src)
    with read_only_folder(tmp_path / "ro") as ro:
        with pytest.raises(StreameditError, match="cannot write in the output folder"):
            VideoWriter(ro / "out.mp4", src)


@pytest.mark.parametrize("link", [os.link, os.symlink])
def test_output_linked_to_the_input_is_refused(tmp_path, link):
    """A hard link (same inode, another name) or a symlink to the input is the input: never written."""
    inp = make_test_clip(tmp_path / "in.mp4", frames=3)
    data = inp.read_bytes()
    link(inp, tmp_path / "alias.mp4")
    with pytest.raises(StreameditError, match="would overwrite the input file"):
        VideoWriter(tmp_path / "alias.mp4", open_video(inp, size=32))
    assert inp.read_bytes() == data and sorted(p.name for p in tmp_path.iterdir()) == ["alias.mp4", "in.mp4"]


def _old_output(tmp_path, frames=4):
    """An existing good output (its bytes, to compare) that a new run is about to replace."""
    old = make_test_clip(tmp_path / "out.mp4", frames=frames, width=40, height=40)
    return old, old.read_bytes()


def test_existing_output_is_replaced_only_when_the_new_one_is_complete(tmp_path):
    inp = make_test_clip(tmp_path / "in.mp4", frames=12, width=64, height=48, audio=True)
    out, before = _old_output(tmp_path)
    os.chmod(out, 0o640)
    src = open_video(inp, size=32)
    with VideoWriter(out, src) as w:
        for frame in src.frames():
            w.write(frame)
            assert out.read_bytes() == before  # the old file stays whole while the new one is written
        (partial,) = [p for p in tmp_path.iterdir() if p.name.startswith(".out.mp4.")]
        assert partial.suffix == ".mp4" and partial.stat().st_size > 0
    times, size, audio = probe(out)
    assert len(times) == 12 and size == (64, 48) and audio is not None
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.mp4", "out.mp4"]  # no temporary file left
    assert out.stat().st_mode & 0o777 == 0o640  # the replaced file's permissions are kept


def test_symlinked_output_replaces_its_target(tmp_path):
    inp = make_test_clip(tmp_path / "in.mp4", frames=5)
    (tmp_path / "real").mkdir()
    target, _ = _old_output(tmp_path / "real")
    (tmp_path / "link.mp4").symlink_to(target)
    stylize(open_video(inp, size=32), tmp_path / "link.mp4")
    assert (tmp_path / "link.mp4").is_symlink() and len(probe(target)[0]) == 5


class FullDisk:
    """The writer's container, whose writes fail with ENOSPC after ``after`` packets (or on close)."""

    def __init__(self, out, after=None, on_close=False):
        self.out, self.after, self.on_close, self.n = out, after, on_close, 0

    def mux(self, packets):
        if self.after is not None and self.n >= self.after:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.n += 1
        return self.out.mux(packets)

    def close(self):
        self.out.close()
        if self.on_close:  # the index (moov) did not fit
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def __getattr__(self, name):
        return getattr(self.out, name)


@pytest.mark.parametrize("workers", [0, 2], ids=["caller-thread", "encoder-thread"])
@pytest.mark.parametrize("where", [dict(after=5), dict(on_close=True)], ids=["mid-run", "at-close"])
def test_full_disk_keeps_the_old_file_and_cleans_up(tmp_path, where, workers):
    inp = make_test_clip(tmp_path / "in.mp4", frames=24, audio=True)
    out, before = _old_output(tmp_path)
    src = open_video(inp, size=32)
    with pytest.raises(StreameditError) as err:
        with VideoWriter(out, src, workers=workers) as w:
            w._out = FullDisk(w._out, **where)
            for frame in src.frames():
                w.write(frame)
    assert str(err.value) == f"cannot write {out}: No space left on device (the existing file is left as it was)"
    assert out.read_bytes() == before and len(probe(out)[0]) == 4  # still the old, playable file
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.mp4", "out.mp4"]


def test_full_disk_without_an_old_file_leaves_nothing(tmp_path):
    src = open_video(make_test_clip(tmp_path / "in.mp4", frames=12), size=32)
    with pytest.raises(StreameditError, match="nothing was saved"):
        with VideoWriter(tmp_path / "out.mkv", src) as w:
            w._out = FullDisk(w._out, after=2)
            for frame in src.frames():
                w.write(frame)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.mp4"]


def _write_until_interrupted(out, src, frames: int) -> None:
    """Write ``frames`` frames of ``src`` to ``out``, then a Ctrl-C inside the writer."""
    with pytest.raises(KeyboardInterrupt):
        with VideoWriter(out, src) as w:
            for i, frame in enumerate(src.frames()):
                if i == frames:
                    raise KeyboardInterrupt
                w.write(frame)


@pytest.mark.parametrize("ext", [".mp4", ".mkv"])
def test_interrupted_writer_leaves_playable_file(tmp_path, ext):
    inp = make_test_clip(tmp_path / "in.mp4", frames=48, audio=True)
    out = tmp_path / f"out{ext}"
    _write_until_interrupted(out, open_video(inp, size=32), 10)
    times, _, audio = probe(out)
    assert len(times) == 10
    assert audio is not None and audio < 10 / 24 + 0.1  # audio cut near the last written frame


def test_nothing_written_leaves_no_file(tmp_path):
    src = open_video(make_test_clip(tmp_path / "in.mp4", frames=3), size=32)
    with pytest.raises(KeyboardInterrupt):
        with VideoWriter(tmp_path / "out.mp4", src):
            raise KeyboardInterrupt
    assert not (tmp_path / "out.mp4").exists()
    out, before = _old_output(tmp_path)  # an existing output is not truncated by a run that wrote nothing
    with pytest.raises(KeyboardInterrupt):
        with VideoWriter(out, src):
            raise KeyboardInterrupt
    assert out.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["in.mp4", "out.mp4"]


def test_interrupted_run_over_an_existing_output_finalizes_what_it_has(tmp_path):
    inp = make_test_clip(tmp_path / "in.mp4", frames=24)
    out, _ = _old_output(tmp_path)
    _write_until_interrupted(out, open_video(inp, size=32), 7)
    assert len(probe(out)[0]) == 7 and sorted(p.name for p in tmp_path.iterdir()) == ["in.mp4", "out.mp4"]


@pytest.mark.parametrize("threads", [0, 2], ids=["one-thread", "reader-and-encoder-threads"])
def test_ctrl_c_in_real_process(tmp_path, threads):
    """A real SIGINT mid-write (KeyboardInterrupt can land anywhere) still leaves a complete file, also with
    the reader decoding ahead and the writer converting and encoding on threads of their own."""
    inp = make_test_clip(tmp_path / "in.mp4", frames=200, width=64, height=48, audio=True)
    out = tmp_path / "out.mp4"
    script = textwrap.dedent(f"""
        import sys, time
        from streamedit.video.io import VideoWriter, open_video
        src = open_video({str(inp)!r}, size=32)
        w = VideoWriter({str(out)!r}, src, workers={threads})
        try:
            with w:
                for frame in src.frames(ahead={threads} * 4):
                    w.write(frame)
                    print(w.frames_written, flush=True)
                    time.sleep(0.01)
        except KeyboardInterrupt:
            print("written", w.frames_written, flush=True)
            sys.exit(130)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    for line in proc.stdout:
        if int(line) >= 20:
            proc.send_signal(2)
            break
    rest = proc.communicate(timeout=60)[0].split()
    assert proc.returncode == 130, rest
    written = int(rest[rest.index("written") + 1])
    assert written < 200 and len(probe(out)[0]) == written


def test_rotated_phone_video_is_turned_upright(tmp_path):
    inp = tmp_path / "rot.mp4"
    stored = np.zeros((48, 64, 3), np.uint8)
    stored[:12, :12] = 255  # marker in the stored top-left corner
    with av.open(str(inp), "w") as c:
        s = c.add_stream("libx264", rate=24)
        s.width, s.height, s.pix_fmt = 64, 48, "yuv420p"
        s.set_display_rotation(90)  # display = stored rotated 90 degrees counter-clockwise
        for i in range(4):
            f = av.VideoFrame.from_ndarray(stored, format="rgb24")
            f.pts = i
            c.mux(s.encode(f))
        c.mux(s.encode())
    src = open_video(inp, size=64)
    assert (src.info.width, src.info.height, src.info.rotation) == (48, 64, 90)
    first = next(iter(src.frames()))
    ys, xs = np.nonzero(first[..., 0] > 128)
    assert ys.mean() > 48 and xs.mean() < 16  # marker now bottom-left
    times, size, _ = probe(stylize(open_video(inp, size=64), tmp_path / "out.mp4"))
    assert size == (48, 64) and len(times) == 4


def test_writer_without_source_and_frames_restart(tmp_path):
    with VideoWriter(tmp_path / "plain.mkv", fps=Fraction(30000, 1001), size=(40, 30)) as w:
        for v in range(5):
            w.write(np.full((16, 16, 3), v * 50, np.uint8))  # any input size is resized
    times, size, audio = probe(tmp_path / "plain.mkv")
    assert size == (40, 30) and audio is None
    assert times == pytest.approx([i * 1001 / 30000 for i in range(5)], abs=1e-3)
    src = open_video(tmp_path / "plain.mkv", size=8)
    assert len(list(src.frames())) == 5 and len(list(src.frames())) == 5  # second pass starts over
    with pytest.raises(ValueError):
        w.write(np.zeros((8, 8, 3), np.uint8))  # closed


def test_second_ctrl_c_waits_for_finalization():
    from streamedit.video.io import _signals_deferred

    done = []
    with pytest.raises(KeyboardInterrupt):
        with _signals_deferred():
            signal.raise_signal(signal.SIGINT)
            done.append(True)  # still runs: the signal is held back ...
    assert done  # ... and re-raised afterwards
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_read_frames_none_keeps_the_stored_size(tmp_path):
    from streamedit.video.clips import make_test_clip, read_frames

    clip = make_test_clip(tmp_path / "c.mp4", frames=3, width=96, height=64)
    assert read_frames(clip)[0].shape == (64, 96, 3)
    assert read_frames(clip, size=32)[0].shape == (32, 32, 3)


def test_opens_inputs_with_pyav_without_metadata_errors(tmp_path, monkeypatch):
    """PyAV 19 dropped ``av.open(metadata_errors=...)``: inputs still open and decode."""
    inp = make_test_clip(tmp_path / "in.mp4", frames=8, width=64, height=64, fps=24, audio=True)
    real_open = av.open
    seen = []

    def open_without_option(*args, **kwargs):
        if "metadata_errors" in kwargs:
            raise TypeError("open() got an unexpected keyword argument 'metadata_errors'")
        seen.append(args[1:2])
        return real_open(*args, **kwargs)

    monkeypatch.setattr(av, "open", open_without_option)
    src = open_video(inp, size=32)
    frames = list(src.frames())
    src.close()
    assert len(frames) == 8 and frames[0].shape == (32, 32, 3)
    assert () in seen  # the input was opened for reading, without the option
