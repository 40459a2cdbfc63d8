"""aiortc glue: the outgoing stylized track and the task that drains the incoming camera track."""

from __future__ import annotations

import asyncio
import logging
import time

from aiortc import MediaStreamTrack
from aiortc.mediastreams import MediaStreamError

from .session import VIDEO_TIME_BASE, Session

log = logging.getLogger(__name__)


class StylizedTrack(MediaStreamTrack):
    """Video track fed by the session worker; keeps at most two frames (older ones are dropped)."""

    kind = "video"

    def __init__(self, session: Session, depth: int = 2):
        super().__init__()
        self.session = session
        self._queue: asyncio.Queue = asyncio.Queue()
        self._depth = depth
        self._t0: float | None = None
        self._last_pts = -1

    def put(self, item) -> None:
        """Called on the loop (via call_soon_threadsafe) with (frame, arrival, input pts, prompt_switch_from, prompt)."""
        if self.readyState != "live":
            return
        while self._queue.qsize() >= self._depth:
            old = self._queue.get_nowait()
            self.session.stats.dropped_output += 1
            if old is not None and old[3] is not None and item[3] is None:
                item = (*item[:3], old[3], *item[4:])  # keep the prompt-switch marker of a dropped frame
        self._queue.put_nowait(item)

    def stop(self) -> None:
        super().stop()
        self._queue.put_nowait(None)

    async def recv(self):
        if self.readyState != "live":
            raise MediaStreamError
        item = await self._queue.get()
        if item is None:
            raise MediaStreamError
        frame, arrival, in_pts, switch_from, prompt = (*item, None)[:5]
        now = time.monotonic()
        if self._t0 is None:
            self._t0 = now
        pts = max(int((now - self._t0) / VIDEO_TIME_BASE), self._last_pts + 1)
        self._last_pts = pts
        frame.pts, frame.time_base = pts, VIDEO_TIME_BASE
        stats = self.session.stats
        if switch_from is not None:
            stats.prompt_switch_frames = stats.sent - switch_from
        stats.sent += 1
        stats.sent_times.append(now)
        stats.latencies.append(now - arrival)
        if self.session.trace is not None:
            self.session.trace.append((pts, in_pts, prompt))
        return frame


async def drain(track: MediaStreamTrack, session: Session) -> None:
    """Read decoded frames as fast as they come and hand them to the session (never blocks on it)."""
    try:
        while True:
            frame = await track.recv()
            session.submit(frame, time.monotonic())
    except (MediaStreamError, asyncio.CancelledError):
        pass
    except Exception:  # a broken decoder must not take the server down
        log.exception("session %s: input track failed", session.id)


async def discard(track: MediaStreamTrack) -> None:
    """Consume a track the session does not use (aiortc would otherwise queue its frames forever)."""
    try:
        while True:
            await track.recv()
    except (MediaStreamError, asyncio.CancelledError):
        pass
    except Exception:
        log.debug("discarded track failed", exc_info=True)
