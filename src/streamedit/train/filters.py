"""The classic stylization filters the demo model learns to imitate, each named by its instruction.

All are OpenCV (main modules, no contrib): deterministic, RGB uint8 in and out, any size. The
parameters are chosen for 256x256 frames, the demo model's working size.
"""

from __future__ import annotations

import cv2
import numpy as np


def oil_painting(rgb: np.ndarray) -> np.ndarray:
    """Edge-preserving smoothing flattens brush areas; a detail pass brings the strokes back."""
    smooth = cv2.edgePreservingFilter(rgb, flags=cv2.RECURS_FILTER, sigma_s=60, sigma_r=0.5)
    hsv = cv2.cvtColor(cv2.detailEnhance(smooth, sigma_s=10, sigma_r=0.25), cv2.COLOR_RGB2HSV)
    hsv[..., 1] = cv2.multiply(hsv[..., 1], 1.35)  # richer pigment (saturating multiply)
    return cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)


def watercolor(rgb: np.ndarray) -> np.ndarray:
    return cv2.stylization(rgb, sigma_s=50, sigma_r=0.45)


def pencil_sketch(rgb: np.ndarray) -> np.ndarray:
    """Colour-dodge sketch: gray / blurred inverse (dark lines on white paper), as 3 equal channels."""
    gray = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
    blurred = cv2.GaussianBlur(255 - gray, (0, 0), sigmaX=6)
    sketch = cv2.divide(gray, 255 - blurred, scale=256)
    return np.repeat(sketch[..., None], 3, axis=2)


def cartoon(rgb: np.ndarray) -> np.ndarray:
    """Bilateral-smoothed, colour-quantised fill with dark adaptive-threshold edges."""
    color = rgb
    for _ in range(3):
        color = cv2.bilateralFilter(color, d=9, sigmaColor=60, sigmaSpace=7)
    color = (color // 32) * 32 + 16
    gray = cv2.medianBlur(cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY), 7)
    edges = cv2.adaptiveThreshold(gray, 255, cv2.ADAPTIVE_THRESH_MEAN_C, cv2.THRESH_BINARY, 9, 8)
    edges = cv2.erode(edges, np.ones((2, 2), np.uint8))
    return np.where(edges[..., None] > 0, color, color // 4).astype(np.uint8)


STYLES = {"oil painting": oil_painting, "watercolor": watercolor, "pencil sketch": pencil_sketch,
          "cartoon": cartoon}


def apply_style(instruction: str, rgb: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(STYLES[instruction](np.ascontiguousarray(rgb)))
