"""Similar-frame filter (``EngineConfig.skip_similar``): re-emit the last output for unchanged input.

StreamDiffusion's idea (skip the diffusion for frames that barely differ), made deterministic:
a frame counts as unchanged when the **mean absolute difference of its 64x64 grayscale thumbnail
(INTER_AREA) to the thumbnail of the last frame that was actually stylized** is at most the
threshold, in 8-bit gray levels (0-255). Its output is then that stylized frame's output.

* Why a thumbnail MAD: ~0.1 ms per 512² frame on the CPU (prefetch thread), no GPU work, and the
  8x8 area average removes sensor noise (σ≈2 levels per pixel -> ≈0.25 on the thumbnail) that a
  per-pixel measure would read as change. Threshold 0 skips only bit-identical thumbnails (a paused
  or duplicated-frame source); ~1 also skips a noisy static camera; a few levels start to freeze
  small motion (a blinking eye moves the 64x64 mean by well under 1 level).
* Why against the last *stylized* frame and not the previous input: a slow pan or fade changes
  each frame by less than the threshold; compared pairwise it would be frozen forever, compared to
  the frame whose output is shown the error stays bounded by the threshold.

In the engine the prefetch thread makes the thumbnails and a provisional decision (a batch it
judges all-unchanged is not prepared: no pinning, TE preprocessing or flow); the decision that
counts is taken again on the host thread in stream order, against the frames really stylized
with the current prompt (a prompt change resets the reference), and a batch the prefetch thread
skipped but that must run after all is prepared then.
"""

from __future__ import annotations

import cv2
import numpy as np

THUMB = 64


def thumbnail(frame: np.ndarray) -> np.ndarray:
    """HxWx3 uint8 RGB -> 64x64 float32 gray levels."""
    gray = cv2.cvtColor(frame, cv2.COLOR_RGB2GRAY)
    return cv2.resize(gray, (THUMB, THUMB), interpolation=cv2.INTER_AREA).astype(np.float32)


class SimilarityFilter:
    """Per frame: is it within ``threshold`` of the reference (the last frame judged changed)?"""

    def __init__(self, threshold: float):
        self.threshold = float(threshold)
        self.ref: np.ndarray | None = None

    def reset(self) -> None:
        """Forget the reference: the next frame is stylized (prompt changed, outputs lost)."""
        self.ref = None

    def distance(self, thumb: np.ndarray) -> float:
        return float("inf") if self.ref is None else float(np.abs(thumb - self.ref).mean())

    def mark(self, thumbs: list[np.ndarray]) -> list[bool]:
        """True = re-emit the reference's output; a False frame becomes the new reference."""
        same = []
        for t in thumbs:
            skip = self.distance(t) <= self.threshold
            if not skip:
                self.ref = t
            same.append(skip)
        return same
