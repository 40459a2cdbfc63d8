"""What the multi-stream engine (engine/multi.py) measures about itself: how busy the GPU is with its ticks
(:class:`BusyClock`), how long a batch of each bucket takes once warm (:func:`time_buckets`), and how
many streams that holds at a target frame rate (:func:`capacity`)."""

from __future__ import annotations

import math
import statistics
import time
from collections import deque

import numpy as np
import torch

from .streams import Pending, Stream


FULLER_TICK = 0.1  # rows_per_tick: serve more ready streams at once for at most this share of frames per second


class BusyClock:
    """The share of wall time the engine's ticks kept the device busy.

    A tick is busy from the start of its first queued device work to the end of its outputs' copy to the
    host. On CUDA both ends are CUDA events (``source == "cuda-events"``: the GPU's own clock, so a tick's
    time excludes the host's preparation while the GPU idles); on CPU they are the host's perf_counter
    around the tick (``"host"``). Ticks overlap when pipelined, so busy time is the union of the intervals
    (ticks end in launch order)."""

    def __init__(self, cuda: bool, window_s: float = 10.0):
        self.cuda, self.window_s = cuda, window_s
        self.source = "cuda-events" if cuda else "host"
        self.reset()

    def reset(self) -> None:
        self.since = time.perf_counter()
        self.busy_s = 0.0
        self._end: float | None = None
        self._base = None  # the first tick's start event: CUDA times are measured from it
        self._recent: deque = deque()  # (host time the tick was handed out, busy seconds it added)

    def event(self, stream) -> torch.cuda.Event | None:
        """A timing event recorded on ``stream`` now (None on CPU)."""
        if not self.cuda:
            return None
        event = torch.cuda.Event(enable_timing=True)
        event.record(stream)
        return event

    def add(self, t_start: float, t_end: float, start_event=None, end_event=None) -> None:
        """One tick, after its end event completed (host perf_counter times are used without events)."""
        if start_event is not None and end_event is not None:
            if self._base is None:
                self._base = start_event
            t_start = self._base.elapsed_time(start_event) / 1e3
            t_end = self._base.elapsed_time(end_event) / 1e3
        added = max(0.0, t_end - max(t_start, self._end if self._end is not None else t_start))
        self._end = t_end if self._end is None else max(self._end, t_end)
        self.busy_s += added
        now = time.perf_counter()
        self._recent.append((now, added))
        while self._recent and now - self._recent[0][0] > self.window_s:
            self._recent.popleft()

    def report(self) -> dict:
        now = time.perf_counter()
        wall = max(now - self.since, 1e-9)
        recent = sum(b for t, b in self._recent if now - t <= self.window_s)
        return {"busy_share": min(1.0, self.busy_s / wall),
                "busy_share_recent": min(1.0, recent / min(wall, self.window_s)),
                "busy_window_s": self.window_s, "busy_clock": self.source, "wall_s": wall}


class Laps:
    """``lap(name)``: the milliseconds since the previous lap (or ``t0``) into ``into[name]`` (a tick's
    launch by part: TickRecord.phases_ms)."""

    def __init__(self, into: dict, t0: float):
        self.into, self.last = into, t0

    def __call__(self, name: str) -> None:
        now = time.perf_counter()
        self.into[name] = 1e3 * (now - self.last)
        self.last = now


def engine_report(engine) -> dict:
    """A MultiStreamEngine's report: per stream (by id) served fps, latency (submit -> handed out) p50/p95
    in ms, frames dropped by latest-frame-wins, prompt, working (h, w); the batch-size histogram (real rows
    -> batches), totals, the busy share (:class:`BusyClock`), the start-up batch times in ms by working
    size "WxH" and bucket (``batch_ms``: measured; ``warm_ms``: each bucket's first batch), the error that
    stopped it (None)."""
    ms = {f"{w}x{h}": {b: round(1e3 * t, 2) for b, t in times.items()}
          for (h, w), times in engine.batch_seconds.items()}
    warm = {f"{w}x{h}/{b}": round(1e3 * t, 1) for ((h, w), b), t in engine.warm_seconds.items()}
    streams = {s.id: dict(s.stats.as_dict(), prompt=s.prompt, shape=s.shape) for s in engine.streams}
    error = None if engine.error is None else repr(engine.error)[:300]
    return dict(streams=streams, histogram=dict(sorted(engine.histogram.items())), batches=engine.stats.batches,
                frames=engine.stats.frames, buckets=list(engine.buckets), max_streams=engine.max_streams,
                batch_ms=ms, warm_ms=warm, error=error, ticks=tick_summary(engine.tick_log),
                **engine.clock.report())


def tick_summary(records, last: int = 512) -> dict:
    """The ``last`` handed-out ticks (telemetry.TickRecord): ticks per second, real rows per tick, the host's
    time to queue one (``launch_ms``) and blocked on its outputs (``wait_ms``), launch to outputs on the host
    (``tick_ms``), the parts of ``launch_ms`` (``phases_ms``: TickRecord.phases_ms), as [p50, p95]; TE calls
    and cond rows rewritten per tick (means). Empty before any tick."""
    done = [r for r in list(records) if r.t_done is not None and r.launch_ms is not None][-last:]
    if not done:
        return {}

    def p50_p95(values):
        return [round(float(v), 2) for v in np.percentile(values, [50, 95])]

    span = done[-1].t_done - done[0].t_done
    return dict(count=len(done), ticks_per_s=round((len(done) - 1) / span, 2) if span > 0 else None,
                rows_mean=round(float(np.mean([sum(x is not None for x in r.streams) for r in done])), 2),
                launch_ms=p50_p95([r.launch_ms for r in done]), wait_ms=p50_p95([r.wait_ms for r in done]),
                tick_ms=p50_p95([1e3 * (r.t_done - r.t_launch) for r in done]),
                te_calls_mean=round(float(np.mean([r.te_calls for r in done])), 2),
                cond_rows_mean=round(float(np.mean([r.cond_rows for r in done])), 2),
                cond_embedded_mean=round(float(np.mean([r.cond_embedded for r in done])), 2),
                phases_ms={k: p50_p95([r.phases_ms.get(k, 0.0) for r in done]) for k in done[-1].phases_ms})


def warm_items(engine, shape: tuple[int, int], bucket: int) -> list:
    """``bucket`` throw-away streams (ids < 0, not registered: nothing is delivered) with a grey frame each."""
    frame = np.full((*shape, 3), 128, np.uint8)
    return [(Stream(engine, -1 - i, engine.config.prompt, 0, True, lambda out: None, shape),
             Pending(0, frame, None, time.perf_counter())) for i in range(bucket)]


def time_buckets(engine, shape: tuple[int, int], repeats: int = 5) -> dict[int, float]:
    """Seconds per batch of each bucket at ``shape`` (the median of ``repeats`` synchronous batches, each
    launched and handed out before the next: no overlap between batches, so a conservative figure)."""
    out = {}
    for bucket in engine.buckets:
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            engine._finish(engine._launch(-1, shape, warm_items(engine, shape, bucket)))
            times.append(time.perf_counter() - t0)
        out[bucket] = statistics.median(times)
    return out


def rows_per_tick(batch_s: dict[int, float] | None, ready: int, buckets: tuple[int, ...]) -> int:
    """How many of ``ready`` streams the next tick serves: with measured batch times, the most n = min(ready, b)
    over buckets b whose frames per second (n / t[b]) come within ``FULLER_TICK`` of the best; without,
    min(ready, largest bucket). Why: padding is not free. On an H100 (512², 2026-12-06) a batch of 8 took
    60 ms and one of 4 34 ms, so 5 ready streams are served faster 4 at a time (the fifth next tick: 118
    frames/s) than padded to 8 (83). But 3 ready streams go together (88 frames/s, against 96 for 2 at a
    time): leaving one behind costs it a tick of latency, and live ticks (engine/ticks.py) then run short."""
    if not batch_s:
        return min(ready, buckets[-1])
    rate: dict[int, float] = {}
    for b in buckets:
        if b in batch_s:
            n = min(ready, b)
            rate[n] = max(rate.get(n, 0.0), n / batch_s[b])
    best = max(rate.values())
    return max(n for n, r in rate.items() if r >= (1 - FULLER_TICK) * best)


def stream_fps(batch_s: dict[int, float], streams: int) -> float:
    """Frames per second each of ``streams`` busy streams gets: every tick serves n = :func:`rows_per_tick`
    of the K streams (least recently served first) in a batch padded to the next bucket, so each stream is
    served n/K of the ticks: fps(K) = n / (K * t[bucket(n)])."""
    buckets = tuple(sorted(batch_s))
    n = rows_per_tick(batch_s, streams, buckets)
    bucket = next(x for x in buckets if x >= n)
    return n / (streams * batch_s[bucket])


def capacity(batch_s: dict[int, float], target_fps: float, limit: int = 64) -> int:
    """The most streams (1 to ``limit``) that each get at least ``target_fps`` (:func:`stream_fps`);
    1 when even one stream cannot."""
    fits = [k for k in range(1, limit + 1) if stream_fps(batch_s, k) >= target_fps * (1 - 1e-9)]
    return max(fits, default=1)


def summary(batch_s: dict[int, float]) -> str:
    """'1: 6.1 ms, 2: 7.0 ms, ...' for start-up messages."""
    return ", ".join(f"{b}: {1e3 * t:.1f} ms" for b, t in sorted(batch_s.items()) if not math.isnan(t))
