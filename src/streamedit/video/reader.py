"""Video file decoding on PyAV: open any input, check it, and yield its frames upright at the working size.

Geometry (:mod:`streamedit.video.geometry`): each frame is resized, keeping its aspect, to the working
size: ``size`` is the long side, the short side is rounded to the model's multiple (1920x1080 at 512
-> 512x288); nothing is squashed. With ``crop`` frames are centre-cropped to a square first
(``size x size``). Downscaling uses ``cv2.INTER_AREA`` (no aliasing); upscaling ``cv2.INTER_CUBIC``
(sharper than linear at the same cost; Lanczos is ~8x slower at 1080p, too slow for real time).
Rotated phone video (display-matrix rotation) is turned upright on decode; ``info`` reports the
upright size. Alpha is dropped (with a warning); grayscale/10-bit become RGB8. The writer is
:mod:`streamedit.video.writer`.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import queue
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import av
import numpy as np

from ..errors import StreameditError
from .geometry import MULTIPLE, fit, working_shape

log = logging.getLogger("streamedit.video.io")  # the name it logged under before the reader/writer split

@dataclass(frozen=True)
class VideoInfo:
    width: int                  # upright display size
    height: int
    fps: Fraction
    time_base: Fraction         # of the video stream; VideoSource.pts are in this unit
    frame_count: int | None     # from the header, else duration * fps, else None
    has_audio: bool
    pix_fmt: str
    duration: float | None      # seconds
    rotation: int = 0           # counter-clockwise degrees applied to make frames upright


def _open_input(path: Path):
    """``av.open`` for reading, tolerating badly encoded metadata (PyAV < 19 asks for it; 19 removed the option)."""
    try:
        return av.open(str(path), metadata_errors="ignore")
    except TypeError:
        return av.open(str(path))


def _ffmpeg_reason(e: Exception) -> str:
    return " ".join(str(getattr(e, "strerror", None) or e).split())  # always one line


class VideoSource:
    """An opened input video. Use :func:`open_video`."""

    def __init__(self, path: str | os.PathLike, size: int = 512, keep_size: bool = False, crop: bool = False,
                 multiple: int = MULTIPLE):
        self.path, self.keep_size, self.crop = Path(path), keep_size, crop
        self.size = int(size) if size else None  # None: frames as stored (clips.read_frames)
        self._container = None
        first = self._start()  # fail here, before any processing, on unreadable input
        rot = int(round((first.rotation or 0) / 90)) % 4 * 90
        w, h = (first.height, first.width) if rot in (90, 270) else (first.width, first.height)
        c = self._container
        duration = self._video_duration or (c.duration / av.time_base if c.duration else None)
        count = self._stream.frames or (round(duration * self._fps) if duration else None)
        has_audio = any(s.codec_context is not None for s in c.streams.audio)
        self.info = VideoInfo(w, h, self._fps, self._tb, count, has_audio, first.format.name, duration, rot)
        # the working (height, width) of the frames yielded; None: as stored
        self.shape = working_shape(h, w, self.size, multiple, crop) if self.size else None
        _alpha_notice(self.path, first.format)

    def _start(self):
        """(Re)open the file and decode the first frame, so empty/undecodable input fails early."""
        self.close()
        self.warning: str | None = None
        self.pts: list[int] = []          # timestamp of every frame yielded so far (VideoWriter reuses them)
        self.exhausted = False            # True once the last frame has been yielded
        p = self.path
        if not p.exists():
            raise StreameditError(f"input file not found: {p}")
        if p.is_dir():
            raise StreameditError(f"input is a directory, not a video file: {p}")
        if p.is_file() and p.stat().st_size == 0:
            raise StreameditError(f"input file is empty: {p}")
        try:
            self._container = _open_input(p)
        except (av.error.InvalidDataError, av.error.EOFError):
            raise StreameditError(f"not a readable video file (unknown format, or damaged): {p}") from None
        except (av.FFmpegError, OSError) as e:
            raise StreameditError(f"cannot open {p}: {_ffmpeg_reason(e)}") from None
        # Cover art in audio files shows up as a one-picture "video" stream; that is not a video.
        streams = [s for s in self._container.streams.video
                   if not s.disposition & av.stream.Disposition.attached_pic]
        if not streams:
            self._fail(f"no video stream in {p}" + (" (audio-only file)" if self._container.streams.audio else ""))
        if streams[0].codec_context is None:
            self._fail(f"{p}: its video codec is not supported by this FFmpeg build")
        self._stream = st = streams[0]
        st.thread_type = "AUTO"  # frame threading: several times faster decode
        self._fps = Fraction(st.average_rate or st.guessed_rate or st.base_rate or 30)
        self._tb = st.time_base or 1 / self._fps
        self._video_duration = float(st.duration * self._tb) if st.duration else None
        with contextlib.suppress(KeyError, ValueError):  # Matroska/WebM keep it in a per-track tag
            hh, mm, ss = st.metadata["DURATION"].split(":")
            self._video_duration = self._video_duration or int(hh) * 3600 + int(mm) * 60 + float(ss)
        raw = self._decode()
        first = next(raw, None)
        if first is None:
            self._fail(f"no decodable video frames in {p}" + (f" ({self.warning})" if self.warning else ""))
        self._raw = itertools.chain([first], raw)
        return first

    def _decode(self):
        """Yield decoded av.VideoFrames; a demux/decode error or a short stream ends it with a warning."""
        last, n, step = None, 0, max(1, round(1 / (self._fps * self._tb)))
        try:
            for frame in self._container.decode(self._stream):
                pts = frame.pts if frame.pts is not None else (0 if last is None else last + step)
                if last is not None and pts <= last:  # encoders need strictly increasing pts
                    pts = last + 1
                self.pts.append(pts)
                last, n = pts, n + 1
                yield frame
        except av.FFmpegError as e:
            self._warn(f"video stream is corrupt after frame {n}; stopped decoding there ({_ffmpeg_reason(e)})")
            return
        # Demuxers often just stop at a truncated/garbled spot: compare with what the header promised
        # (duration first: mp4 edit lists can legitimately hide some of the header's frame count).
        dur, expected = self._video_duration, self._stream.frames
        end = float((last - self.pts[0] + step) * self._tb) if n else 0.0
        if n and (end < dur - 2 / self._fps - 0.05 if dur else expected and n < expected):
            got = f"{n} of {expected} frames" if expected else f"{n} frames ({end:.2f}s of {dur:.2f}s)"
            self._warn(f"video stream ended early, after {got}; file truncated or damaged?")

    def _fail(self, msg: str):
        self.close()
        raise StreameditError(msg)

    def _warn(self, msg: str):
        self.warning = msg
        log.warning("%s: %s", self.path, msg)

    def frames(self, ahead: int = 0):
        """Yield HxWx3 uint8 RGB frames at the working ``shape`` (as stored if ``size`` is None). A second
        call starts over. ``ahead`` > 0 decodes and resizes on a thread, up to that many frames ahead of
        the caller (PyAV, swscale and cv2 release the GIL), so a GPU loop does not wait on decode."""
        if ahead > 0:
            return read_ahead(self._frames(), ahead)
        return self._frames()

    def _frames(self):
        if self._raw is None:
            self._start()
        raw, self._raw = self._raw, None
        for frame in raw:
            kw = {}
            if frame.colorspace == 2 and frame.height >= 720:  # untagged HD: BT.709, as players assume
                kw["src_colorspace"] = "itu709"
            if self.shape is not None and not (self.info.rotation or self.crop) and \
                    self.shape[0] * self.shape[1] < frame.height * frame.width:
                # shrink and convert in one swscale pass (area filter): at 1080p -> 512x288 a third of the CPU of
                # converting the whole frame to RGB and resizing it with cv2
                small = frame.reformat(width=self.shape[1], height=self.shape[0], format="rgb24",
                                       interpolation="AREA", **kw)
                yield np.ascontiguousarray(small.to_ndarray())
                continue
            rgb = frame.to_ndarray(format="rgb24", **kw)
            if self.info.rotation:
                rgb = np.rot90(rgb, self.info.rotation // 90)
            yield np.ascontiguousarray(rgb) if self.shape is None else fit(rgb, self.shape, self.crop)
        self.exhausted = True
        self.close()

    def close(self):
        if self._container is not None:
            self._container.close()
            self._container, self._raw = None, None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


READ_AHEAD = 16  # frames a model loop's reader decodes ahead: two batches of 8, about 70 MB at 1080p


def start_reader(items: Iterator, prepare=None, maxsize: int = 1):
    """A daemon thread putting ``prepare(item)`` (or the item) for each item on a bounded queue, then ``end``.

    Returns (queue, stop event, end marker, thread). An exception (source or preparation) is put on the
    queue for the consumer to raise; setting ``stop`` ends the thread at its next put and closes
    ``items`` (so a generator source runs its cleanup).
    """
    ready: queue.Queue = queue.Queue(maxsize=maxsize)
    stop, end = threading.Event(), object()

    def put(item) -> bool:
        while not stop.is_set():
            try:
                ready.put(item, timeout=0.05)
                return True
            except queue.Full:
                pass
        return False

    def read():
        try:
            for item in items:
                if not put(prepare(item) if prepare is not None else item):
                    return
            put(end)
        except BaseException as exc:  # noqa: BLE001 - re-raised by the consumer
            put(exc)
        finally:
            close = getattr(items, "close", None)
            if close is not None:
                close()

    thread = threading.Thread(target=read, daemon=True, name="streamedit-reader")
    thread.start()
    return ready, stop, end, thread


def read_ahead(items: Iterator, depth: int) -> Iterator:
    """``items`` produced on a thread of their own, up to ``depth`` ahead of the consumer, in order. An
    exception there is raised here; a consumer that stops early (or is interrupted) stops the thread within
    one item, and ``items`` is closed on it before this generator returns."""
    ready, stop, end, thread = start_reader(items, maxsize=depth)
    try:
        while True:
            item = ready.get()
            if item is end:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        thread.join()


def _alpha_notice(path: Path, fmt) -> None:
    """Say so when the input is transparent: frames are decoded to opaque RGB."""
    if any(c.is_alpha for c in fmt.components):
        log.warning("%s: its alpha channel (transparency, %s) is dropped: the output is opaque", path, fmt.name)


def open_video(path: str | os.PathLike, size: int = 512, keep_size: bool = False, crop: bool = False,
               multiple: int = MULTIPLE) -> VideoSource:
    """Open ``path`` for decoding; raises StreameditError (one line) if it is not a usable video.
    Frames come at the working size for ``size`` (the long side, module docstring)."""
    return VideoSource(path, size=size, keep_size=keep_size, crop=crop, multiple=multiple)

