"""Training data for the demo model: augmented crops of video frames and their filtered targets.

Any folder of clips works; clips named in ``holdout`` are kept out for validation. Each training
frame gives ``crops_per_frame`` random-resized crops (35-100 % of the short side, random position,
horizontal flip, mild brightness/contrast/saturation jitter) at the working size; every filter of
:mod:`streamedit.train.filters` is applied to each crop *after* augmentation, so a target is
exactly the filter of its source. Filtering runs in a process pool (OpenCV's photo filters are
single-image CPU work).
"""

from __future__ import annotations

import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import cv2
import numpy as np

from ..errors import StreameditError
from ..video.clips import find_clips, read_frames
from .filters import STYLES, apply_style


def split_clips(folder: str | os.PathLike, holdout: list[str]) -> tuple[list[Path], list[Path]]:
    """(training clips, held-out clips) of a folder; ``holdout`` names clips by file stem."""
    root = Path(folder)
    if not root.is_dir():
        raise StreameditError(f"clip folder {str(root)!r} does not exist")
    clips = find_clips([root])
    unknown = set(holdout) - {p.stem for p in clips}
    if unknown:
        raise StreameditError(f"held-out clip(s) not in {str(root)!r}: {', '.join(sorted(unknown))}")
    train = [p for p in clips if p.stem not in holdout]
    if not train:
        raise StreameditError("every clip is held out: nothing left to train on")
    return train, [p for p in clips if p.stem in holdout]


def random_crop(frame: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    h, w = frame.shape[:2]
    side = int(min(h, w) * rng.uniform(0.35, 1.0))
    y, x = rng.integers(0, h - side + 1), rng.integers(0, w - side + 1)
    crop = cv2.resize(frame[y:y + side, x:x + side], (size, size), interpolation=cv2.INTER_AREA)
    if rng.random() < 0.5:
        crop = crop[:, ::-1]
    hsv = cv2.cvtColor(np.ascontiguousarray(crop), cv2.COLOR_RGB2HSV).astype(np.float32)
    hsv[..., 1] *= rng.uniform(0.8, 1.2)
    hsv[..., 2] = (hsv[..., 2] - 128) * rng.uniform(0.85, 1.15) + 128 + rng.uniform(-12, 12)
    return cv2.cvtColor(np.clip(hsv, 0, 255).astype(np.uint8), cv2.COLOR_HSV2RGB)


def _filter_all(image: np.ndarray) -> np.ndarray:
    cv2.setNumThreads(1)  # one image per process; the pool provides the parallelism
    return np.stack([apply_style(name, image) for name in STYLES])


def with_targets(sources: np.ndarray, workers: int | None = None) -> np.ndarray:
    """(N,S,S,3) sources -> (N,len(STYLES),S,S,3) filtered targets."""
    workers = workers or min(16, os.cpu_count() or 1)
    if workers <= 1 or len(sources) < 8:
        return np.stack([_filter_all(s) for s in sources])
    # spawn, not fork: a forked child inherits OpenCV's and torch's thread pools in a dead state and hangs
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        return np.stack(list(pool.map(_filter_all, sources, chunksize=16)))


def build_examples(clips: list[Path], size: int, crops_per_frame: int, seed: int = 0,
                   max_frames: int | None = None, workers: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Augmented training crops of every frame of ``clips`` and their filtered targets."""
    rng = np.random.default_rng(seed)
    sources = [random_crop(f, size, rng) for clip in clips for f in read_frames(clip, None, max_frames)
               for _ in range(crops_per_frame)]
    sources = np.stack(sources)
    return sources, with_targets(sources, workers)


def validation_frames(clips: list[Path], size: int, max_frames: int | None = None) -> np.ndarray:
    """Whole held-out frames at the (square) working size, centre-cropped (the runtime's ``--crop``)."""
    return np.stack([f for clip in clips for f in read_frames(clip, size, max_frames, crop=True)])


STYLE_NAMES = list(STYLES)
