"""The live commands' default engine: one :class:`~streamedit.engine.multi.MultiStreamEngine` for every
session (`serve`) or input (`live`), with the settings :func:`choose_engine` picks, prepared (compiled,
graphs captured, batch times measured) before the first client comes."""

from __future__ import annotations

import logging
import queue
import sys
import threading
import time
from dataclasses import dataclass

import numpy as np

from ..config import PRESETS, EngineConfig
from ..errors import StreameditError

log = logging.getLogger(__name__)
# the presets a multi-stream engine runs (it encodes every frame: no te_batch_one / te_refresh_every)
SHARED_PRESETS = ("exact", "paper", "eager")
TARGET_FPS = 24.0  # --target-fps default: the rate --max-sessions is derived for (issue 25's "held" rate)
CPU_MAX_SESSIONS = 2  # on CPU the video codecs share the cores with the model: an engine-only figure overstates
# The GIL's switch interval while a shared engine runs (CPython's default: 5 ms). A refresh flow (Farnebäck on a
# pool thread, temporal/conditioner.py) gives the GIL up at each OpenCV call and must win it back after, beside
# the server's busy Python threads (WebRTC, ticks, hand-out): each win-back can wait out whole intervals, on the
# tick's critical path. H100 host, scripts/flow_probe.py (2026-12-07): one flow 25 ms alone; beside two busy
# threads 141-181 ms p50 at 5 ms, 55 at 1 ms, 45-47 at 0.5 ms, 31 at 0.2 ms.
LIVE_SWITCH_INTERVAL_S = 0.0005
_switch = {"engines": 0, "saved": None}  # running shared engines; the interval before the first one started
_switch_lock = threading.Lock()


def _count_running(engine: SharedEngine, running: bool) -> None:
    """Count ``engine`` in or out of the running shared engines: the first one in shortens the switch interval,
    the last one out restores it."""
    with _switch_lock:
        if engine._running == running:
            return
        engine._running = running
        if running and _switch["engines"] == 0:
            _switch["saved"] = sys.getswitchinterval()
            sys.setswitchinterval(min(_switch["saved"], LIVE_SWITCH_INTERVAL_S))
        _switch["engines"] += 1 if running else -1
        if not running and _switch["engines"] == 0:
            sys.setswitchinterval(_switch["saved"])


@dataclass(frozen=True)
class EngineChoice:
    shared: bool  # one multi-stream engine for all sessions (else an eager engine per session)
    preset: str  # config.PRESETS name of the shared engine's settings ("eager" for the per-session engine)
    why: str


def choose_engine(cuda: bool, shared: bool | None = None, preset: str | None = None) -> EngineChoice:
    """What `serve`/`live` run. Default: the shared engine everywhere; with the exact preset (fast TE,
    compiled, CUDA graphs) on CUDA, eager on CPU (compiling on CPU costs minutes and gains little).
    ``shared=False`` (--no-shared-engine) is the per-session eager engine of earlier releases."""
    if preset is not None and preset not in SHARED_PRESETS:
        raise StreameditError(f"--preset {preset}: the live commands run {', '.join(SHARED_PRESETS)}")
    if shared is False:
        if preset not in (None, "eager"):
            raise StreameditError(f"--no-shared-engine runs an eager engine per session: --preset {preset} needs "
                                  "the shared engine (drop one of them)")
        return EngineChoice(False, "eager", "--no-shared-engine: an eager engine per session, taking turns")
    if preset is not None:
        return EngineChoice(True, preset, f"--preset {preset}")
    if cuda:
        return EngineChoice(True, "exact", "on CUDA: fast text encoder, compiled, CUDA graphs")
    return EngineChoice(True, "eager", "on CPU: nothing compiled")


class SharedStream:
    """A session's stream of a :class:`SharedEngine`. ``streaming``: the session submits frames as they come
    and reads outputs on a thread of its own (the engine drops all but a stream's newest unserved frame);
    ``process`` (submit one, wait for it) serves callers with a loop of their own (`live`)."""

    concurrent = True  # no server engine lock: the engine batches the sessions itself
    streaming = True

    def __init__(self, shared: SharedEngine, prompt: str, size: int):
        self.shared = shared
        self.stream = shared.engine.open_stream(prompt, size=size)
        self.last_prompt: str | None = None

    @property
    def prompt(self) -> str:
        return self.stream.prompt

    def set_prompt(self, prompt: str) -> None:
        self.stream.set_prompt(prompt)

    def check_prompt(self, prompt: str) -> None:
        """StreameditError if the shared engine's text encoder cannot take ``prompt`` (too long)."""
        self.stream.engine.te.check_prompt(prompt)

    def submit(self, frame: np.ndarray, meta: object = None) -> int:
        """Queue a frame (raises StreameditError for a malformed one: only this stream is affected)."""
        return self.stream.submit(frame, meta)

    def next_output(self, timeout: float):
        """The next StreamOutput, None after ``timeout``; StreameditError once the stream ended (its error)."""
        try:
            out = self.stream.get(timeout=timeout)
        except queue.Empty:
            return None
        self.last_prompt = out.prompt
        return out

    def process(self, frames: list[np.ndarray], timeout: float = 300.0) -> list[np.ndarray]:
        """Each frame's output, in order (one at a time: nothing is dropped)."""
        outs = []
        for frame in frames:
            index = self.submit(frame)
            deadline = time.monotonic() + timeout
            while True:
                if time.monotonic() > deadline:
                    raise StreameditError(f"no output for frame {index} within {timeout:.0f} s")
                out = self.next_output(0.5)
                if out is not None and out.index == index:
                    outs.append(out.image)
                    break
        return outs

    @property
    def stats(self) -> dict:
        return {"stream": self.stream.id, **self.stream.stats.as_dict()}

    def close(self) -> None:
        self.stream.close()


class SharedEngine:
    """One multi-stream engine: one model, no U-Net copies with an adapter, sessions batched together."""

    def __init__(self, models, size: int, steps: int = 1, lllite: str | None = None, te_size: int | None = None,
                 max_streams: int = 8, batch_size: int = 4, preset: str = "eager", prompt: str = "oil painting"):
        from ..engine.multi import MultiStreamEngine  # torch, diffusers: not for `streamedit serve --help`

        fields = dict(prompt=prompt, batch_size=batch_size, steps=steps, size=size, fixed_noise=True, lllite=lllite,
                      **PRESETS[preset])
        if te_size is not None:  # given on the command line: it wins over the preset's
            fields["te_size"] = te_size
        self.preset = preset
        self._running = False  # counted among the running shared engines (the GIL switch interval)
        self.engine = MultiStreamEngine(models, EngineConfig(**fields), max_streams=max_streams)

    def prepare(self, frame_sizes: list[tuple[int, int]], size: int | None = None, measure: int = 0) -> list[dict]:
        """Build, compile and (on CUDA) capture every bucket's graphs for inputs of ``frame_sizes``, and with
        ``measure`` time that many batches per bucket; one dict per working size (what start-up prints)."""
        engine, done = self.engine, []
        warm = engine.cuda or measure > 0
        for frame_size in frame_sizes:
            t0 = time.perf_counter()
            shape = engine.prepare(frame_size, size, warm=warm, measure=measure)
            done.append({"shape": shape, "seconds": time.perf_counter() - t0, "warm": warm,
                         "batch_s": engine.batch_seconds.get(shape)})
        return done

    def start(self) -> None:
        """Start the engine's threads (no-op once running); the process's GIL switch interval is shortened
        to :data:`LIVE_SWITCH_INTERVAL_S` until the last running shared engine closes."""
        _count_running(self, True)
        self.engine.start()

    def close(self) -> None:
        self.engine.close()
        _count_running(self, False)


def describe_prepared(done: dict, buckets) -> str:
    from ..engine.multistats import summary

    h, w = done["shape"]
    what = "compiled and captured" if done["warm"] else "built (eager: nothing to capture)"
    line = f"{what} {w}x{h} for batches of {', '.join(map(str, buckets))} in {done['seconds']:.1f} s"
    if done["batch_s"]:
        line += f"; batch time {summary(done['batch_s'])}"
    return line
