"""Whole clips: find video files, read a clip's frames, write a list of frames to a file, and synthetic
test clips (moving, static, noise, cut).

Used by the tests, ``streamedit bench`` (generated frames), ``streamedit eval`` (saved videos),
``streamedit train`` (clip folders) and ``scripts/make_example_clip.py``. Streaming read/write for real runs lives in :mod:`streamedit.video.io`.
"""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import av
import numpy as np

from ..errors import StreameditError
from .io import _add_video_stream, _open_output, _to_av_frame, open_video

VIDEO_SUFFIXES = (".mp4", ".mkv", ".mov", ".webm", ".avi", ".m4v", ".mpg", ".mpeg", ".ts")


def find_clips(entries, exclude=()) -> list[Path]:
    """Video files from files and folders (a folder contributes its video files, sorted), minus ``exclude``
    (matched against a file's name or stem)."""
    clips: list[Path] = []
    for entry in entries:
        p = Path(entry).expanduser()
        if p.is_dir():
            clips += sorted(f for f in p.iterdir() if f.is_file() and f.suffix.lower() in VIDEO_SUFFIXES)
        elif p.is_file():
            clips.append(p)
        else:
            raise StreameditError(f"--clips {str(entry)!r}: no such file or folder")
    skip = set(exclude)
    clips = [c for c in clips if c.name not in skip and c.stem not in skip]
    if not clips:
        raise StreameditError(f"no video clips ({', '.join(VIDEO_SUFFIXES)}) to use: --clips gave none, "
                              "or --exclude removed them all")
    return clips


def read_frames(path, size: int | None = None, max_frames: int | None = None, crop: bool = False) -> list[np.ndarray]:
    """A clip's frames (RGB uint8): at the working size for ``size`` (the long side; video/reader.py; ``crop``: the
    centre square at ``size x size``), or as stored (None)."""
    frames = []
    with open_video(path, size=size, crop=crop) as video:
        for frame in video.frames():
            frames.append(frame)
            if max_frames and len(frames) >= max_frames:
                break
    return frames


def write_clip(path, frames, fps=24, *, pix_fmt="yuv420p", audio=None, sample_rate=48000, crf=18) -> Path:
    """Encode ``frames`` (HxWx3 RGB, HxWx4 RGBA or HxW gray uint8) exactly as given (no resizing or
    padding), stored as ``pix_fmt``: libx264 if it can, else FFV1 (.mkv; odd sizes, alpha), VP9 or PNG.
    ``audio``: float samples in [-1, 1], shape (n,) or (channels, n), at ``sample_rate``."""
    path, frames = Path(path), list(frames)
    if not frames:
        raise ValueError("write_clip needs at least one frame")
    (h, w), ext = frames[0].shape[:2], path.suffix.lower()
    fps = Fraction(fps).limit_denominator(100000)
    # libx264 only for YUV: the H.264 decoder returns 4:0:0 (gray) as yuv420p, hiding the format.
    codecs = ("libx264", "ffv1", "libvpx-vp9", "png") if pix_fmt.startswith(("yuv", "nv")) else ("ffv1", "png")
    fmt = av.VideoFormat(pix_fmt)
    if (w % 2 and fmt.chroma_width(w) != w) or (h % 2 and fmt.chroma_height(h) != h):  # x264: even 4:2:x
        codecs = ("ffv1", "libvpx-vp9")
    out = _open_output(path)
    try:
        vs = _add_video_stream(out, ext, w, h, fps, 1 / fps, pix_fmt, crf, "medium", codecs)
        chunks = []
        if audio is not None:
            a = np.atleast_2d(np.asarray(audio, np.float32))
            layout = {1: "mono", 2: "stereo"}[len(a)]
            ast = out.add_stream("libopus" if ext == ".webm" else "aac", rate=48000 if ext == ".webm" else sample_rate,
                                 layout=layout)
            for i in range(0, a.shape[1], 1024):
                af = av.AudioFrame.from_ndarray(np.ascontiguousarray(a[:, i:i + 1024]), format="fltp", layout=layout)
                af.sample_rate, af.pts, af.time_base = sample_rate, i, Fraction(1, sample_rate)
                chunks.append(af)
        for i, img in enumerate(frames):
            frame = _to_av_frame(img, pix_fmt)
            frame.pts, frame.time_base = i, 1 / fps
            out.mux(vs.encode(frame))
            while chunks and chunks[0].pts / sample_rate < (i + 1) / fps:  # interleave audio with video
                out.mux(ast.encode(chunks.pop(0)))
        out.mux(vs.encode(None))
        if audio is not None:
            for af in chunks:
                out.mux(ast.encode(af))
            out.mux(ast.encode(None))
    finally:
        out.close()
    return path


def _scene(t: int, w: int, h: int, alt: bool = False) -> np.ndarray:
    """A scrolling gradient with a bouncing square; ``alt`` is a visibly different scene (for cuts)."""
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    if alt:
        v = 0.5 + 0.5 * np.sin((x + y + 2 * t) / max(w, h) * 12)
        img = np.stack([40 + 60 * v, 120 + 100 * v, 200 - 80 * v], -1)
    else:
        img = np.stack([255 * ((x + 2 * t) % w) / w, 255 * y / h, np.full_like(x, 90)], -1)
    s = max(2, min(w, h) // 4)
    rx, ry = max(1, w - s), max(1, h - s)  # travel range of the square's corner
    px, py = (3 * t) % (2 * rx), (2 * t) % (2 * ry)
    cx, cy = min(px, 2 * rx - px), min(py, 2 * ry - py)
    img[cy:cy + s, cx:cx + s] = (240, 60, 60) if alt else (250, 240, 40)
    return img.astype(np.uint8)


def make_test_clip(path, frames=24, width=64, height=48, fps=24, audio=False, pix_fmt="yuv420p",
                   pattern="moving", cut_at=None, seed=0) -> Path:
    """Write a small synthetic clip. ``pattern``: "moving" (scrolling gradient + bouncing square),
    "static" (one frame repeated), "noise" (uniform random, seeded) or "cut" (moving scene, then a
    different scene from frame ``cut_at``, default frames // 2). ``audio`` adds a 440 Hz stereo tone.
    Alpha formats (yuva420p, ...) get a horizontal alpha ramp. Use .mkv for odd sizes or alpha."""
    if pattern not in ("moving", "static", "noise", "cut"):
        raise ValueError(f"unknown pattern {pattern!r}")
    cut_at = frames // 2 if cut_at is None else cut_at
    rng = np.random.default_rng(seed)
    alpha = len(av.VideoFormat(pix_fmt).components) in (2, 4)
    imgs = []
    for i in range(frames):
        if pattern == "noise":
            img = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
        else:
            img = _scene(0 if pattern == "static" else i, width, height, alt=pattern == "cut" and i >= cut_at)
        if alpha:
            ramp = np.linspace(64, 255, width, dtype=np.float32).astype(np.uint8)
            img = np.dstack([img, np.broadcast_to(ramp, (height, width))])
        imgs.append(img)
    tone = None
    if audio:
        t = np.arange(int(48000 * frames / fps)) / 48000
        tone = np.stack([0.3 * np.sin(2 * np.pi * 440 * t)] * 2)
    return write_clip(path, imgs, fps, pix_fmt=pix_fmt, audio=tone, sample_rate=48000)
