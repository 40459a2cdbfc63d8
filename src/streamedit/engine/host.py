"""Host-side helpers of the engine: frames to the working size, and the reader thread of the low-latency schedule."""

from __future__ import annotations

import queue
import threading

import numpy as np

from ..config import check_frame
from ..video.geometry import fit


def to_working(frame: np.ndarray, shape: tuple[int, int], crop: bool = False) -> np.ndarray:
    """A frame at the working (h, w): centre-cropped first with ``crop``, resized keeping the aspect
    it had when the working size was chosen (a later frame of another aspect is fitted to it)."""
    return fit(check_frame(frame), shape, crop)


def start_reader(items, prepare, maxsize: int):
    """A daemon thread putting ``prepare(item)`` for each item on a bounded queue, then ``end``.

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
                if not put(prepare(item)):
                    return
            put(end)
        except BaseException as exc:  # re-raised by the consumer
            put(exc)
        finally:
            items.close()

    thread = threading.Thread(target=read, daemon=True, name="streamedit-reader")
    thread.start()
    return ready, stop, end, thread
