"""Working geometry: the size the model runs at for an input of a given shape.

The model works at an aspect-preserving size: ``size`` is the long side and the short side keeps the
input's aspect, rounded to the model's multiple (``vae_scale_factor * 4`` = 32 for DreamLite: the
latent is downsampled twice inside the U-Net), e.g. 1920x1080 at 512 -> 512x288. Nothing is squashed
(resizing is the same factor along both axes up to that rounding). ``crop`` keeps the older,
paper-style alternative: centre-crop to a square, then resize to ``size x size``.
"""

from __future__ import annotations

import cv2
import numpy as np

MULTIPLE = 32  # DreamLite: vae_scale_factor 8 x the U-Net's two downsamplings (engine_config.validate)


def working_shape(height: int, width: int, size: int, multiple: int = MULTIPLE, crop: bool = False) -> tuple[int, int]:
    """(height, width) of the working frames for a ``height x width`` input: the long side ``size``, the
    short side the same aspect rounded to the nearest ``multiple`` (at least one); a square with ``crop``.
    The rounding changes the aspect by at most half a multiple; the output is scaled back to the input's
    size, which undoes it."""
    if crop or height == width:
        return size, size
    short = max(multiple, int(size * min(height, width) / max(height, width) / multiple + 0.5) * multiple)  # half up
    return (size, short) if height > width else (short, size)


def centre_crop(img: np.ndarray) -> np.ndarray:
    """The centred square of side min(H, W)."""
    h, w = img.shape[:2]
    s = min(h, w)
    y, x = (h - s) // 2, (w - s) // 2
    return img[y:y + s, x:x + s]


def fit(img: np.ndarray, shape: tuple[int, int], crop: bool = False) -> np.ndarray:
    """``img`` (HxWx3 uint8) at the working ``shape`` (h, w), centre-cropped to a square first with ``crop``.
    Downscaling uses INTER_AREA (no aliasing), upscaling INTER_CUBIC."""
    if crop:
        img = centre_crop(img)
    h, w = shape
    if img.shape[:2] == (h, w):
        return np.ascontiguousarray(img)
    shrink = w * h < img.shape[0] * img.shape[1]
    return cv2.resize(np.ascontiguousarray(img), (w, h), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_CUBIC)
