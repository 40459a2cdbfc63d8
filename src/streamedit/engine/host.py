"""Host-side helpers of the engine: frames to the working size, and the reader thread of the low-latency schedule
(``start_reader``, shared with the file reader's read-ahead in video/reader.py)."""

from __future__ import annotations

import numpy as np

from ..config import check_frame
from ..video.geometry import fit
from ..video.reader import start_reader

__all__ = ["start_reader", "to_working"]


def to_working(frame: np.ndarray, shape: tuple[int, int], crop: bool = False) -> np.ndarray:
    """A frame at the working (h, w): centre-cropped first with ``crop``, resized keeping the aspect
    it had when the working size was chosen (a later frame of another aspect is fitted to it)."""
    return fit(check_frame(frame), shape, crop)
