"""One live stylization session: a latest-frame-wins input queue, a worker thread that owns the
engine, and the aiortc track that carries the stylized frames back to the browser.

Nothing here blocks the asyncio loop: frames arrive on the loop (``submit``), the worker thread
takes them, runs the engine and hands results back with ``loop.call_soon_threadsafe``. With a
streaming engine (a stream of the shared multi-stream engine, serve/shared.py) the worker only
converts and submits frames, and a second thread reads the stream's outputs, so the session has a
frame waiting while the engine runs the previous one (the engine keeps only the newest).
"""

from __future__ import annotations

import asyncio
import contextlib
import fractions
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

import cv2
import numpy as np

from ..config import check_prompt
from ..errors import StreameditError
from ..video.geometry import fit, working_shape

log = logging.getLogger(__name__)

VIDEO_TIME_BASE = fractions.Fraction(1, 90000)


class LatestQueue:
    """Bounded thread-safe queue; when full, the oldest item is dropped (latest-frame-wins)."""

    def __init__(self, maxsize: int = 1):
        self.maxsize = max(1, maxsize)
        self._items: deque = deque()
        self._cond = threading.Condition()
        self.dropped = 0
        self.closed = False

    def put(self, item) -> None:
        with self._cond:
            if self.closed:
                return
            while len(self._items) >= self.maxsize:
                self._items.popleft()
                self.dropped += 1
            self._items.append(item)
            self._cond.notify()

    def get_batch(self, n: int, timeout: float) -> list:
        """Up to ``n`` items (oldest first); [] after ``timeout`` seconds or once closed."""
        with self._cond:
            self._cond.wait_for(lambda: self._items or self.closed, timeout)
            out = []
            while self._items and len(out) < n:
                out.append(self._items.popleft())
            return out

    def close(self) -> None:
        with self._cond:
            self.closed = True
            self._items.clear()
            self._cond.notify_all()


def square_resize(rgb: np.ndarray, size: int) -> np.ndarray:
    """Center-crop to a square and resize to ``size`` x ``size`` (the ``crop`` geometry)."""
    h, w = rgb.shape[:2]
    s = min(h, w)
    y, x = (h - s) // 2, (w - s) // 2
    crop = rgb[y:y + s, x:x + s]
    if s == size:
        return np.ascontiguousarray(crop)
    interp = cv2.INTER_AREA if s > size else cv2.INTER_LINEAR
    return cv2.resize(crop, (size, size), interpolation=interp)


@dataclass
class SessionStats:
    received: int = 0
    processed: int = 0
    sent: int = 0
    dropped_output: int = 0
    started: float = field(default_factory=time.monotonic)
    input_size: tuple[int, int] | None = None
    latencies: deque = field(default_factory=lambda: deque(maxlen=120))  # seconds, arrival -> handed to encoder
    sent_times: deque = field(default_factory=lambda: deque(maxlen=240))
    prompt_switch_frames: int | None = None  # frames sent between a prompt request and its first frame

    def fps(self, window: float = 5.0) -> float:
        now = time.monotonic()
        times = [t for t in self.sent_times if now - t <= window]
        if len(times) < 2:
            return 0.0
        return (len(times) - 1) / max(times[-1] - times[0], 1e-6)

    def latency_ms(self, q: float) -> float | None:
        if not self.latencies:
            return None
        return round(float(np.quantile(np.array(self.latencies), q)) * 1000.0, 1)


class Session:
    """Engine, worker thread and stats for one connected client."""

    def __init__(self, sid: str, engine_factory: Callable, prompt: str, size: int, loop: asyncio.AbstractEventLoop,
                 *, batch_size: int = 1, max_queue: int = 1, max_input_pixels: int = 1920 * 1080,
                 engine_lock: threading.Lock | None = None, on_error: Callable[[str], None] | None = None,
                 trace: bool = False, crop: bool = False, track_factory: Callable | None = None):
        self.id = sid
        self.size, self.crop = size, crop  # long side of the working size; crop: a centre square instead
        self.shape: tuple[int, int] | None = None  # working (h, w): the first frame's aspect decides
        self.batch_size = batch_size
        self.max_input_pixels = max_input_pixels
        self.loop = loop
        self.queue = LatestQueue(max_queue)
        self.stats = SessionStats()
        self.prompt = check_prompt(prompt)
        self.active_prompt: str | None = None
        self.error: str | None = None
        self.on_error = on_error
        self._engine_factory = engine_factory
        self._engine_lock = engine_lock or threading.Lock()
        self._pending_prompt: tuple[str, int] | None = None  # (prompt, stats.sent when requested)
        self._prompt_lock = threading.Lock()
        self._thread = threading.Thread(target=self._work, name=f"streamedit-session-{sid}", daemon=True)
        self._closed = False
        self.trace: deque | None = deque(maxlen=2000) if trace else None  # (output pts, input pts, prompt)
        self.channel = None  # the WebRTC data channel, once the browser opens it
        self.outbox: list[dict] = []  # what the server said before that channel was open (sent when it opens)
        self.tasks: list = []  # asyncio tasks the server runs for this session
        self.engine = None  # what the factory made, once the worker made it
        self._reader: threading.Thread | None = None  # streaming engines: reads outputs
        self._switch: tuple[int, int] | None = None  # (first stream frame with the new prompt, stats.sent then)
        # the outgoing aiortc track (serve/tracks.py, made by the server: aiortc is imported only there)
        self.track = track_factory(self) if track_factory is not None else None

    @property
    def closed(self) -> bool:
        return self._closed

    # ---- called on the asyncio loop -------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def submit(self, frame, arrival: float | None = None) -> None:
        """Queue one decoded input frame (an ``av.VideoFrame`` or an RGB array)."""
        if self._closed:
            return
        w, h = (frame.width, frame.height) if hasattr(frame, "width") else (frame.shape[1], frame.shape[0])
        if w * h > self.max_input_pixels:
            self.fail(f"input resolution {w}x{h} is over this server's limit of {self.max_input_pixels} pixels")
            return
        self.stats.received += 1
        self.stats.input_size = (w, h)
        self.queue.put((frame, arrival if arrival is not None else time.monotonic(), getattr(frame, "pts", None)))

    def set_prompt(self, prompt) -> str:
        prompt = check_prompt(prompt)
        check = getattr(self.engine, "check_prompt", None)  # one the engine cannot take: refused here
        if check is not None:
            try:
                check(prompt)
            except StreameditError as exc:
                raise ValueError(str(exc)) from None
        with self._prompt_lock:
            self.prompt = prompt
            self._pending_prompt = (prompt, self.stats.sent)
        return prompt

    def fail(self, message: str) -> None:
        if self.error is None:
            self.error = message
            log.warning("session %s: %s", self.id, message)
            if self.on_error:
                self.on_error(message)

    def snapshot(self) -> dict:
        s = self.stats
        engine = getattr(self.engine, "stats", None) or {}  # a shared engine's view of this stream
        dropped_input = self.queue.dropped + engine.get("dropped", 0)  # session queue + latest-frame-wins
        return {
            "id": self.id, "prompt": self.prompt, "active_prompt": self.active_prompt, "size": self.size,
            "working_size": list(self.shape[::-1]) if self.shape else None,
            "fps": round(s.fps(), 2), "latency_ms_p50": s.latency_ms(0.5), "latency_ms_p95": s.latency_ms(0.95),
            "received": s.received, "processed": s.processed, "sent": s.sent,
            "dropped": dropped_input + s.dropped_output, "dropped_input": dropped_input,
            "dropped_output": s.dropped_output, "stream": engine.get("stream"),
            "prompt_switch_frames": s.prompt_switch_frames,
            "input_size": list(s.input_size) if s.input_size else None,
            "uptime_s": round(time.monotonic() - s.started, 1), "error": self.error,
        }

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self.queue.close()
        if self.track is not None:
            self.track.stop()
        if self._thread.is_alive():
            await asyncio.to_thread(self._thread.join, 30)

    # ---- worker thread --------------------------------------------------------------------
    def _work(self) -> None:
        engine = None
        try:
            engine = self.engine = self._engine_factory(self.prompt, self.size)
            self.active_prompt = self.prompt
            if getattr(engine, "streaming", False):
                self._stream(engine)
                return
            while not self._closed:
                batch = self.queue.get_batch(self.batch_size, 0.25)
                if not batch:
                    continue
                switch_from = self._apply_prompt(engine)
                images = [self._working(_to_rgb(item[0])) for item in batch]
                with self._lock_for(engine):
                    outs = engine.process(images)
                self.active_prompt = getattr(engine, "last_prompt", None) or self.active_prompt
                self.stats.processed += len(outs)
                for i, (out, (_, arrival, in_pts)) in enumerate(zip(outs, batch)):
                    self._deliver(out, arrival, in_pts, switch_from if i == 0 else None, self.active_prompt)
        except Exception as exc:  # engine/model problems (a malformed frame, too) end this session only
            self._report(exc)
        finally:
            if engine is not None and hasattr(engine, "close"):
                with self._lock_for(engine):  # its teardown (sync, gc, empty_cache) not in the middle of another batch
                    engine.close()
            if self._reader is not None:  # closing the stream wakes it
                self._reader.join(30)

    def _report(self, exc: Exception) -> None:
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if not self._closed:
            self.loop.call_soon_threadsafe(self.fail, f"engine error: {msg}")

    def _stream(self, engine) -> None:
        """Streaming engines: convert and submit each frame as it comes; outputs are read by ``_read``."""
        self._reader = threading.Thread(target=self._read, args=(engine,), name=f"streamedit-output-{self.id}",
                                        daemon=True)
        self._reader.start()
        while not self._closed and self._reader.is_alive():
            batch = self.queue.get_batch(1, 0.25)
            if not batch:
                continue
            frame, arrival, in_pts = batch[0]
            switch_from = self._apply_prompt(engine)
            index = engine.submit(self._working(_to_rgb(frame)), (arrival, in_pts))
            if switch_from is not None:
                self._switch = (index, switch_from)

    def _read(self, engine) -> None:
        try:
            while not self._closed:
                out = engine.next_output(0.25)
                if out is None:
                    continue
                self.stats.processed += 1
                self.active_prompt = out.prompt or self.active_prompt
                switch, switch_from = self._switch, None
                if switch is not None and out.index >= switch[0]:
                    self._switch, switch_from = None, switch[1]
                self._deliver(out.image, *out.meta, switch_from, out.prompt or self.active_prompt)
        except Exception as exc:  # noqa: BLE001  (the stream failed: its input broke a tick, or the engine died)
            self._report(exc)

    def _lock_for(self, engine):
        """The server's engine lock, unless the engine batches concurrent sessions itself (a shared one)."""
        return contextlib.nullcontext() if getattr(engine, "concurrent", False) else self._engine_lock

    def _working(self, rgb: np.ndarray) -> np.ndarray:
        """The frame at the session's working size (fixed by its first frame; later ones are fitted to it)."""
        if self.shape is None:
            self.shape = working_shape(*rgb.shape[:2], self.size, crop=self.crop)
        return fit(rgb, self.shape, self.crop)

    def _apply_prompt(self, engine) -> int | None:
        """Hand a pending prompt to the engine; returns stats.sent at the time it was requested."""
        with self._prompt_lock:
            pending, self._pending_prompt = self._pending_prompt, None
        if pending is None:
            return None
        engine.set_prompt(pending[0])
        self.active_prompt = pending[0]
        return pending[1]

    def _deliver(self, out: np.ndarray, arrival: float, in_pts, switch_from: int | None, prompt=None) -> None:
        frame = to_yuv420p(out)  # the encoder's format, converted off the loop
        if not self._closed:
            self.loop.call_soon_threadsafe(self.track.put, (frame, arrival, in_pts, switch_from, prompt))


def to_yuv420p(rgb: np.ndarray):
    """An RGB frame as the VP8 encoder's yuv420p frame: BT.601, limited range, as FFmpeg's default conversion
    gives (luma within 1 level on camera images), in OpenCV at a tenth of swscale's CPU time (0.13 vs
    1.5 ms at 512x384): a host cost paid per output frame of every session."""
    import av

    rgb = np.ascontiguousarray(rgb, dtype=np.uint8)
    h, w = rgb.shape[:2]
    if h % 2 or w % 2:  # I420 needs even sides; the working sizes always have them
        return av.VideoFrame.from_ndarray(rgb, format="rgb24").reformat(format="yuv420p")
    return av.VideoFrame.from_ndarray(cv2.cvtColor(rgb, cv2.COLOR_RGB2YUV_I420), format="yuv420p")


def _to_rgb(frame) -> np.ndarray:
    if isinstance(frame, np.ndarray):
        return frame
    return frame.to_ndarray(format="rgb24")
