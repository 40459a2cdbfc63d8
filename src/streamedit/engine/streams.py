"""One input of a :class:`~streamedit.engine.multi.MultiStreamEngine`: its newest unserved frame, prompt,
noise, temporal state and counters. The engine does the work; a :class:`Stream` is what a caller holds."""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

from ..config import clean_prompt
from ..errors import StreameditError

log = logging.getLogger(__name__)


@dataclass
class StreamOutput:
    index: int  # the frame's number in its stream (submit order, from 0; dropped frames keep theirs)
    image: np.ndarray  # HxWx3 uint8 at the stream's working size
    meta: object  # what submit() was given with the frame (a capture timestamp, a pts)
    latency_ms: float  # submit -> handed out
    prompt: str | None = None  # the prompt its frame was encoded with


@dataclass
class StreamStats:
    submitted: int = 0
    processed: int = 0
    dropped: int = 0  # replaced by a newer frame before a tick took it (latest-frame-wins)
    latencies_ms: deque = field(default_factory=lambda: deque(maxlen=1000))  # the newest outputs'
    delivered_at: deque = field(default_factory=lambda: deque(maxlen=300))  # perf_counter of the newest outputs

    def fps(self, window: float = 5.0) -> float:
        """Outputs per second over the last ``window`` seconds."""
        now = time.perf_counter()
        times = [t for t in self.delivered_at if now - t <= window]
        return (len(times) - 1) / max(times[-1] - times[0], 1e-6) if len(times) > 1 else 0.0

    def as_dict(self) -> dict:
        lat = np.asarray(self.latencies_ms, dtype=np.float64)
        p50, p95 = np.percentile(lat, [50, 95]).tolist() if lat.size else (None, None)
        return dict(submitted=self.submitted, processed=self.processed, dropped=self.dropped, fps=self.fps(),
                    latency_p50_ms=p50, latency_p95_ms=p95)


@dataclass
class Pending:
    """A submitted frame waiting for a tick."""
    index: int
    frame: np.ndarray  # at the working size
    meta: object
    t_submit: float
    early: object = None  # TemporalConditioner.early(frame): its cut histogram and refresh flow, from submit


class Stream:
    """A handle on one stream: ``submit`` frames (any thread), read outputs from ``on_output`` or ``get``.

    Latest-frame-wins: a frame not yet taken by a tick is replaced by the next one (counted as dropped).
    """

    def __init__(self, engine, sid: int, prompt: str, seed: int, fixed_noise: bool,
                 on_output: Callable[[StreamOutput], None] | None, shape: tuple[int, int] | None,
                 on_error: Callable[[str], None] | None = None):
        self.engine, self.id, self.seed = engine, sid, seed
        self._prompt = clean_prompt(prompt)
        self.shape = shape  # working (h, w); None until the first frame fixes it
        self.size: int | None = None  # the long side of its working size (the engine's open_stream sets it)
        self.stats = StreamStats()
        self.outputs: queue.Queue[StreamOutput] | None = None if on_output else queue.Queue()
        self.on_output = on_output or self.outputs.put
        self.pending: Pending | None = None
        self.last_served = -1  # when a tick last took it (serve order): the least recently served go first
        self.temporal = None  # its TemporalConditioner (adapter on): previous output, flows, refreshes, cuts
        self.cond: dict | None = None  # its current cond embedding (LLLiteAdapter.row_embeddings, one row)
        self.cond_version = 0  # bumped per refresh: a batch row holding an older one is rewritten
        self.closed = False
        self.error: str | None = None  # why the engine ended this stream (fail())
        self._on_error = on_error
        self._count = 0
        self._fixed = fixed_noise
        self._noise: dict[tuple, torch.Tensor] = {}
        self._gen = torch.Generator("cpu").manual_seed(seed)
        self._lock = threading.Lock()  # submit vs the engine's tick taking the frame

    @property
    def prompt(self) -> str:
        return self._prompt

    def set_prompt(self, prompt: str) -> None:
        """This stream's instruction from its next frame a tick takes; the other streams keep theirs. A prompt
        the engine's text encoder cannot take is refused here (StreameditError), never in a tick."""
        prompt = clean_prompt(prompt)
        self.engine.te.check_prompt(prompt)
        self._prompt = prompt

    def submit(self, frame: np.ndarray, meta: object = None) -> int:
        """Queue an HxWx3 uint8 RGB frame (resized here, on the caller's thread); returns its index."""
        return self.engine._submit(self, frame, meta)

    def put(self, pending: Pending) -> None:
        with self._lock:
            if self.pending is not None:
                self.stats.dropped += 1
                if self.pending.early is not None:  # its flow is not needed any more
                    self.pending.early.cancel()
            self.pending = pending
            self.stats.submitted += 1

    def take(self) -> Pending | None:
        with self._lock:
            pending, self.pending = self.pending, None
            return pending

    def next_index(self) -> int:
        with self._lock:
            self._count += 1
            return self._count - 1

    def get(self, timeout: float | None = None) -> StreamOutput:
        """The next output (streams opened without ``on_output``); raises ``queue.Empty`` after ``timeout``,
        and StreameditError once the stream is closed or failed and its delivered outputs are read."""
        out = self.outputs.get(timeout=timeout)
        if out is None:
            self.outputs.put(None)  # every later call says the same
            raise StreameditError(f"stream {self.id} {'failed: ' + self.error if self.error else 'is closed'}")
        return out

    def noise(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """(1, C, h, w) starting noise: with fixed noise what upstream draws for ``seed`` (as a single-stream
        engine with ``fixed_noise``), else one draw per frame from the stream's own generator."""
        if not self._fixed:
            return torch.randn(shape, generator=self._gen, dtype=dtype)
        key = (shape, dtype)
        if key not in self._noise:
            self._noise[key] = torch.randn(shape, generator=torch.Generator("cpu").manual_seed(self.seed), dtype=dtype)
        return self._noise[key]

    def deliver(self, output: StreamOutput) -> None:
        self.stats.processed += 1
        self.stats.latencies_ms.append(output.latency_ms)
        self.stats.delivered_at.append(time.perf_counter())
        self.on_output(output)

    def close(self) -> None:
        """Leave the engine: the pending frame is discarded, an output still in flight is not delivered."""
        self.engine._close_stream(self)

    def ended(self) -> None:
        """Wake a reader blocked in :meth:`get` (the engine calls this when the stream leaves)."""
        if self.outputs is not None:
            self.outputs.put(None)

    def fail(self, message: str) -> None:
        """End this stream with ``message`` (its input broke a tick, or the engine stopped); the others go on."""
        if self.closed:
            return
        self.error = message
        self.close()
        if self._on_error is not None:
            try:
                self._on_error(message)
            except Exception:  # a consumer's callback must not break the engine
                log.exception("stream %d: its error callback failed", self.id)

    def __enter__(self) -> "Stream":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def latency_ms(t_submit: float) -> float:
    return 1e3 * (time.perf_counter() - t_submit)
