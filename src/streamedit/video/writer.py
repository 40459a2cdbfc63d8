"""Video file encoding on PyAV that never leaves a broken output: a temporary file renamed on success, audio remuxed.

The writer resizes results back to the input's W x H (with ``crop`` the input's centre square at its
resolution, 1920x1080 -> 1080x1080; ``keep_size`` writes the working size), upright as decoded, with the
input's timestamps. Encoding: H.264 (libx264, yuv420p, BT.709 tags) for .mp4/.m4v/.mov/.mkv, VP9 for .webm.
4:2:0 cannot hold odd sizes (H.264 crops only in 2-pixel steps), so an odd width/height is
padded by one replicated column/row (333x257 -> 334x258, with a warning) to stay playable everywhere.
The reader is :mod:`streamedit.video.reader`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import shutil
import signal
import queue
import threading
from concurrent.futures import ThreadPoolExecutor
from fractions import Fraction
from pathlib import Path

import av
import cv2
import numpy as np

from ..errors import StreameditError
from .geometry import fit
from .reader import VideoSource, _ffmpeg_reason, _open_input

log = logging.getLogger("streamedit.video.io")  # the name it logged under before the reader/writer split

# Output extension -> encoders to try, best first.
_H264 = ("libx264", "libopenh264", "mpeg4")
VIDEO_CODECS = {".mp4": _H264, ".m4v": _H264, ".mov": _H264, ".mkv": _H264,
                ".webm": ("libvpx-vp9", "libvpx")}


def check_output(path: Path, source_path: Path | None = None) -> Path:
    """Refuse an output that cannot or must not be written (before anything is); the file it names,
    symlinks followed (what a finished run replaces)."""
    ext = path.suffix.lower()
    if ext not in VIDEO_CODECS:
        raise StreameditError(f"unsupported output extension {ext or '(none)'!r}; use one of {', '.join(VIDEO_CODECS)}")
    if path.is_dir():
        raise StreameditError(f"output path is a directory: {path}")
    if source_path is not None and _same_file(path, source_path):
        raise StreameditError(f"output would overwrite the input file: {path} is {source_path} "
                              "(the same file, or a link to it)")
    if not path.parent.is_dir():
        raise StreameditError(f"output folder does not exist: {path.parent}")
    return Path(os.path.realpath(path))


def _same_file(a: Path, b: Path) -> bool:
    """Same path, symlink or hard link (same device and inode)."""
    if a.resolve() == b.resolve():
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:  # a does not exist (yet)
        return False


def _even_size_notice(path: Path, width: int, height: int) -> None:
    """Say so when the output gets a replicated column/row (4:2:0 video has even sides only)."""
    if width % 2 or height % 2:
        log.warning("%s: %dx%d has an odd side, which 4:2:0 video cannot hold: written as %dx%d "
                    "(last column/row repeated)", path, width, height, width + width % 2, height + height % 2)


def _temp_beside(final: Path) -> Path:
    """A new hidden name in the output's folder (so the rename is atomic), same extension (same format)."""
    return final.with_name(f".{final.name}.{os.getpid()}-{secrets.token_hex(4)}.partial{final.suffix}")


def _open_output(path: Path, source_path: Path | None = None, target: Path | None = None):
    """Open a container for ``path`` (checked) that writes to ``target`` (default: ``path`` itself)."""
    check_output(path, source_path)
    where = f"in the output folder {path.parent}" if target else path
    try:
        if target:  # FFmpeg opens the file only when encoding starts: find a read-only folder now
            with open(target, "xb"):
                pass
        # Index (moov) at the front: plays while downloading; written on close, which we always reach.
        opts = {"movflags": "+faststart"} if path.suffix.lower() in (".mp4", ".m4v", ".mov") else {}
        return av.open(str(target or path), "w", options=opts)
    except (av.FFmpegError, OSError) as e:
        if target and not isinstance(e, FileExistsError):
            target.unlink(missing_ok=True)
        raise StreameditError(f"cannot write {where}: {_ffmpeg_reason(e)}") from None


def _add_video_stream(out, ext, width, height, fps, time_base, pix_fmt="yuv420p", crf=18, preset="veryfast",
                      codecs=None, frame_threads=True):
    for name in codecs or VIDEO_CODECS[ext]:
        try:
            codec = av.Codec(name, "w")
        except av.FFmpegError:
            continue
        if name not in out.supported_codecs or pix_fmt not in {f.name for f in codec.video_formats or ()}:
            continue
        opts = {"libx264": {"crf": str(crf), "preset": preset},
                "libvpx-vp9": {"crf": str(crf + 13), "b": "0", "row-mt": "1", "deadline": "good", "cpu-used": "4"},
                }.get(name, {})
        s = out.add_stream(name, rate=fps, options=opts)
        s.width, s.height, s.pix_fmt = width, height, pix_fmt
        if name == "libx264" and frame_threads:
            # PyAV's default (slice threads) splits each frame across cores: at 1080p it scales poorly. x264's
            # frame threads encode several frames at once (more frames in flight; the same bitstream rules)
            s.codec_context.thread_type = "FRAME"
        s.time_base = s.codec_context.time_base = time_base
        if name in ("mpeg4", "libopenh264", "libvpx"):  # no CRF mode: pick a generous bitrate
            s.bit_rate = int(width * height * float(fps) * 0.25)
        if not pix_fmt.startswith(("gray", "rgb", "bgr", "gbr")):
            cc = s.codec_context  # tag what we convert with, so players do not guess
            cc.colorspace, cc.color_range, cc.color_primaries, cc.color_trc = 1, 1, 1, 1  # BT.709, limited
        return s
    raise StreameditError(f"no encoder for {pix_fmt} in {ext} in this FFmpeg build")


def _to_av_frame(rgb: np.ndarray, pix_fmt: str, size: tuple[int, int] | None = None) -> av.VideoFrame:
    """``rgb`` as a ``pix_fmt`` frame (YUV: BT.709, limited range); ``size`` (w, h): scaled there in the same
    swscale pass, bicubic."""
    fmt = {1: "gray", 3: "rgb24", 4: "rgba"}[1 if rgb.ndim == 2 else rgb.shape[2]]
    frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb), format=fmt)
    scale = {} if size is None else {"width": size[0], "height": size[1], "interpolation": "BICUBIC"}
    if pix_fmt.startswith(("yuv", "nv")):
        return frame.reformat(format=pix_fmt, dst_colorspace="itu709", dst_color_range="MPEG", **scale)
    return frame.reformat(format=pix_fmt, **scale)


def _cores() -> int:
    """CPU cores this process may run on (a container's limit, not the host's count)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


@contextlib.contextmanager
def _signals_deferred(sigs=(signal.SIGINT, signal.SIGTERM)):
    """Hold off Ctrl-C/SIGTERM while a file is finalized (a second Ctrl-C would leave an mp4 without
    its index, i.e. unplayable); the signal is re-raised afterwards."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught = []
    old = {s: signal.signal(s, lambda n, _f: caught.append(n)) for s in sigs}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h if h is not None else signal.SIG_DFL)
        if caught:
            signal.raise_signal(caught[0])


class VideoWriter:
    """Encode RGB frames to ``path``, matching ``source`` in size, fps, timestamps and audio.

    Frame i gets the timestamp of the source's frame i (variable frame rate is kept); frames beyond
    the source's continue at 1/fps. Without a source, give ``fps`` and ``size=(w, h)``.
    Audio (first audio stream) is copied; if the container cannot hold its codec it is re-encoded
    (AAC, Opus for .webm); if that fails too it is dropped with a logged warning. Audio is cut at the
    end of the last written frame unless the whole source was written.

    Output safety: frames go to a hidden temporary file in the output's folder, renamed over ``path``
    when closed, so an existing file is never truncated or half-overwritten. Closing (also by leaving
    the ``with`` block through an exception such as KeyboardInterrupt) flushes the encoder, so the file
    is playable and holds every frame written. If no frame was written, or writing failed (a full
    disk), the temporary file is removed and an existing ``path`` is left as it was; a failed write
    raises StreameditError. The input file itself (also through a hard or symbolic link) is refused.
    """

    def __init__(self, path, source: VideoSource | None = None, *, fps=None, size=None, crf=18,
                 preset="veryfast", audio=True, workers: int | None = None, frame_threads: bool = True):
        """``workers``: threads that scale and convert frames (cv2 and swscale release the GIL), and with
        them one encoder thread that encodes and muxes in write order, so write() returns at once and the
        caller's loop (the GPU's) never waits for x264; 0 does everything on the caller's thread. Default: a
        quarter of the cores, up to 4 (none on a 2-core machine, where the model needs them). Why: at 1080p
        the scale-up, the RGB -> YUV conversion and x264 on the caller's thread held `stylize` to the
        writer's 45 fps on an H100 host, several times below the model path. ``frame_threads``: x264 encodes
        several frames at once (False: PyAV's default, each frame split in slices across the cores)."""
        self.path, self.source, self.frames_written = Path(path), source, 0
        self._accepted = 0  # frames given to write(); frames_written counts those encoded
        workers = min(4, _cores() // 4) if workers is None else workers
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix="streamedit-writer") if workers > 0 else None
        # (future of the converted frame, its pts) in write order; bounded: write() waits when the encoder lags
        self._pending: queue.Queue | None = queue.Queue(2 * workers) if workers > 0 else None
        self._encoder: threading.Thread | None = None
        self._closed, self._last_pts, self._failed = False, None, None
        if source is not None:
            fps, tb, info = source.info.fps, source.info.time_base, source.info
            if source.keep_size and source.shape:
                size = source.shape[::-1]
            elif source.crop:  # the centre square, at the input's resolution
                size = (min(info.width, info.height),) * 2
            else:
                size = (info.width, info.height)
        elif fps is None or size is None:
            raise ValueError("VideoWriter needs a source, or fps and size=(width, height)")
        else:
            fps = Fraction(fps).limit_denominator(100000)
            tb = 1 / fps
        self.fps, self.size = fps, (int(size[0]), int(size[1]))
        self._step = max(1, round(1 / (fps * tb)))
        self._final = check_output(self.path, source.path if source else None)
        self._tmp = _temp_beside(self._final)
        self._out = _open_output(self.path, source.path if source else None, target=self._tmp)
        try:
            w, h = self.size
            _even_size_notice(self.path, w, h)
            self._stream = _add_video_stream(self._out, self.path.suffix.lower(), w + w % 2, h + h % 2, fps, tb,
                                             crf=crf, preset=preset, frame_threads=frame_threads)
            self._ain = self._aout = None
            if audio and source is not None and source.info.has_audio:
                self._setup_audio()
            self._out.start_encoding()  # opens encoders now: bad settings fail before processing
        except BaseException as e:  # incl. Ctrl-C here: leave no half-made file behind
            self._out.close()
            self._tmp.unlink(missing_ok=True)
            if isinstance(e, StreameditError) or not isinstance(e, Exception):
                raise
            raise StreameditError(f"cannot start encoding {self.path}: {_ffmpeg_reason(e)}") from None

    def _setup_audio(self):
        try:
            self._ain = _open_input(self.source.path)  # own demuxer: decode is elsewhere
            tracks = [s for s in self._ain.streams.audio if s.codec_context is not None]
            if len(tracks) > 1:
                log.warning("%s: the input has %d audio tracks; only the first is kept", self.path, len(tracks))
            src = tracks[0]
            try:
                self._aout, self._transcode = self._out.add_stream_from_template(src), False
            except ValueError:  # codec not allowed in this container: re-encode
                codec = "libopus" if self.path.suffix.lower() == ".webm" else "aac"
                rate = 48000 if codec == "libopus" else src.rate
                self._aout = self._out.add_stream(codec, rate=rate, layout=src.layout.name)
                self._transcode = True
            self._apackets, self._apending = self._ain.demux(src), None
        except Exception as e:
            log.warning("%s: dropping audio (%s)", self.path, _ffmpeg_reason(e))
            if self._ain is not None:
                self._ain.close()
            self._ain = self._aout = None

    def _mux_audio(self, until: float | None, final: bool = False):
        """Mux source audio packets that start before ``until`` seconds (all if None)."""
        if self._aout is None:
            return
        try:
            while True:
                pkt = self._apending or next(self._apackets, None)
                self._apending = None
                if pkt is None:
                    break
                ts = pkt.pts if pkt.pts is not None else pkt.dts
                if until is not None and ts is not None and ts * pkt.time_base >= until:
                    self._apending = pkt  # not yet: keeps audio interleaved with video
                    break
                if self._transcode:
                    for frame in pkt.decode():
                        self._mux(self._aout.encode(frame))
                elif pkt.size and pkt.dts is not None:
                    pkt.stream = self._aout
                    self._mux(pkt)
            if not final:
                return
            if self._transcode:
                self._mux(self._aout.encode(None))
        except Exception as e:  # never let audio trouble lose the video (but a failed write is the file's)
            if self._failed:
                raise
            log.warning("%s: audio stopped early (%s)", self.path, _ffmpeg_reason(e))
        self._ain.close()
        self._ain = self._aout = None

    def write(self, rgb: np.ndarray, pts: int | None = None) -> None:
        """Append one HxWx3 uint8 RGB frame (any size; resized to the output size). With ``workers`` the
        frame is copied and converted in the background; close() encodes every frame written."""
        if self._closed:
            raise ValueError("write() on a closed VideoWriter")
        rgb = np.asarray(rgb)
        if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3:
            raise ValueError(f"expected HxWx3 uint8 RGB, got {rgb.dtype} {rgb.shape}")
        if pts is None:
            known = self.source.pts if self.source is not None else ()
            pts = known[self._accepted] if self._accepted < len(known) else (
                0 if self._last_pts is None else self._last_pts + self._step)
        if self._last_pts is not None and pts <= self._last_pts:
            pts = self._last_pts + 1
        self._last_pts, self._accepted = pts, self._accepted + 1
        if self._pool is None:
            self._encode(self._convert(rgb), pts)
            return
        if self._failed:  # the encoder thread hit it (a full disk)
            raise StreameditError(self._failure_message())
        if self._encoder is None:
            self._encoder = threading.Thread(target=self._encode_in_order, name="streamedit-encoder", daemon=True)
            self._encoder.start()
        self._pending.put((self._pool.submit(self._convert, rgb.copy()), pts))  # the caller may reuse rgb

    def _encode_in_order(self) -> None:
        """The encoder thread: converted frames in write order until close()'s None; after a failure it only
        drains (so write() never blocks on a dead encoder) and the failure is raised on the caller's side."""
        while (item := self._pending.get()) is not None:
            if self._failed:
                continue
            try:
                self._encode(item[0].result(), item[1])
            except StreameditError:
                pass  # _mux recorded why
            except Exception as e:  # an encoder error: the output is lost, say why where the caller sees it
                self._failed = _ffmpeg_reason(e)

    def _convert(self, rgb: np.ndarray) -> av.VideoFrame:
        w, h = self.size
        pix_fmt = self._stream.pix_fmt
        if not (w % 2 or h % 2) and pix_fmt.startswith(("yuv", "nv")) and rgb.shape[0] * rgb.shape[1] < w * h:
            # upscale and convert in one swscale pass from the small frame: a 512x288 result to 1080p 4:2:0 costs
            # about a tenth of scaling it in RGB first (cv2) and converting the big frame
            return _to_av_frame(rgb, pix_fmt, (w, h))
        img = fit(rgb, (h, w))
        if w % 2 or h % 2:
            img = cv2.copyMakeBorder(img, 0, h % 2, 0, w % 2, cv2.BORDER_REPLICATE)
        return _to_av_frame(img, self._stream.pix_fmt)

    def _encode(self, frame: av.VideoFrame, pts: int) -> None:
        frame.pts, frame.time_base = pts, self._stream.codec_context.time_base
        self._mux(self._stream.encode(frame))
        self.frames_written += 1
        self._mux_audio(float(pts * frame.time_base))

    def _mux(self, packets) -> None:
        """Write packets to the temporary file; a failure (a full disk) ends the output: StreameditError."""
        try:
            self._out.mux(packets)
        except (OSError, av.FFmpegError) as e:
            self._failed = _ffmpeg_reason(e)
            raise StreameditError(self._failure_message()) from None

    def _failure_message(self) -> str:
        kept = "the existing file is left as it was" if self._final.exists() else "nothing was saved"
        return f"cannot write {self.path}: {self._failed} ({kept})"

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        with _signals_deferred():
            try:
                if self._encoder is not None:  # every frame written gets encoded
                    self._pending.put(None)
                    self._encoder.join()
                if self.frames_written and not self._failed:
                    self._out.mux(self._stream.encode(None))  # flush delayed (B-)frames
                    src = self.source
                    whole = src is not None and src.exhausted and self.frames_written >= len(src.pts)
                    end = (self._last_pts + self._step) * self._stream.codec_context.time_base
                    self._mux_audio(None if whole else float(end), final=True)
            except (OSError, av.FFmpegError, StreameditError) as e:
                self._failed = self._failed or _ffmpeg_reason(e)
            finally:
                if self._pool is not None:
                    self._pool.shutdown(cancel_futures=True)
                if self._ain is not None:
                    self._ain.close()
                try:
                    self._out.close()  # writes the index (mp4: rewrites the file with it at the front)
                except (OSError, av.FFmpegError) as e:
                    self._failed = self._failed or _ffmpeg_reason(e)
            self._finish()

    def _finish(self) -> None:
        """Rename the complete temporary file over the output; else drop it and keep what was there."""
        if self.frames_written and not self._failed:
            try:
                with contextlib.suppress(OSError):  # a replaced file keeps its permissions
                    shutil.copymode(self._final, self._tmp)
                os.replace(self._tmp, self._final)
                return
            except OSError as e:
                self._failed = _ffmpeg_reason(e)
        self._tmp.unlink(missing_ok=True)
        if self._failed:
            raise StreameditError(self._failure_message())

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
        return False
