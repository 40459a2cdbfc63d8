"""Model loading, the engine-choice options and the per-session eager engine of the live commands
(`serve`, `live`); the shared multi-stream engine they use by default is in serve/shared.py."""

from __future__ import annotations

import copy
import dataclasses
import logging

import numpy as np

from ..config import EngineConfig
from ..errors import StreameditError
from .shared import SHARED_PRESETS, SharedEngine, SharedStream

log = logging.getLogger(__name__)
DEFAULT_MODEL = "demo"  # the bundled demo model; random:tiny (with a warning) where it is not installed


def load_runtime(model: str = DEFAULT_MODEL, device: str | None = None, dtype: str | None = None,
                 revision: str | None = None):
    """The model every session shares (same device/dtype defaults and demo fallback as `stylize`)."""
    from ..cli.options import load, resolve_device

    device, torch_dtype = resolve_device(device, dtype)
    return load(model, revision, device, torch_dtype)


def live_model_options(fn):
    """--model/--revision/--device/--dtype/--lllite/--steps/--te-size with the same meaning as in `stylize`."""
    import click

    opts = [
        click.option("--model", default=DEFAULT_MODEL, show_default=True,
                     help="Hub id, local diffusers folder, 'demo', 'random:real' or 'random:tiny'."),
        click.option("--revision", default=None, help="Hub revision (DreamLite-mobile: 'diffusers')."),
        click.option("--device", default=None, help="cpu or cuda (default: cuda when available)."),
        click.option("--dtype", type=click.Choice(("float32", "bfloat16", "float16")), default=None,
                     help="Default: bfloat16 on CUDA, float32 on CPU."),
        click.option("--lllite", default=None, help="Temporal LLLite adapter (.safetensors), or 'random'."),
        click.option("--steps", default=1, show_default=True, type=click.IntRange(1, 4), help="Denoising steps."),
    ]
    for opt in reversed(opts):
        fn = opt(fn)
    from ..cli.options import te_size_option

    return te_size_option(fn)


def set_cpu_threads(models, threads: int | None = None) -> int | None:
    """On CPU, leave cores to the video codecs and the event loop: torch gets half of them by default.

    Measured with the tiny model on 2 cores: 2 torch threads competing with aiortc's encoder/decoder
    threads served 1.9 fps, 1 thread 8.8 fps (OpenMP threads spin while the codecs hold the cores).
    """
    if models.device.type != "cpu":
        return None
    import os

    import torch

    threads = threads or max(1, (os.cpu_count() or 2) // 2)
    torch.set_num_threads(threads)
    return threads


def check_lllite(lllite: str | None) -> str | None:
    if lllite not in (None, "random"):
        from pathlib import Path

        if not Path(lllite).is_file():
            raise StreameditError(f"LLLite adapter file {lllite!r} does not exist")
    return lllite


class LiveEngine:
    """A low-latency ``StreamEngine``: batch 1, no pipelining, fixed noise (no flicker from the noise).

    With an LLLite adapter each engine gets its own copy of the U-Net: the adapter patches the U-Net
    and keeps per-stream cond buffers, so sessions must not share one. Text encoder and VAE are shared.
    """

    def __init__(self, models, prompt: str, size: int, steps: int = 1, lllite: str | None = None, seed: int = 0,
                 lllite_multiplier: float = 1.0, te_size: int = 512):
        from ..engine.stream import StreamEngine  # torch, diffusers: not for `streamedit serve --help`

        config = EngineConfig(prompt=prompt, batch_size=1, steps=steps, size=size, seed=seed, fixed_noise=True,
                              pipeline=False, prefetch=0, te_size=te_size)
        if lllite is not None:
            config = dataclasses.replace(config, lllite=lllite, lllite_multiplier=lllite_multiplier)
            models = dataclasses.replace(models, unet=copy.deepcopy(models.unet))
        self.engine = StreamEngine(models, config)
        self.last_prompt: str | None = None  # the prompt the engine encoded the latest batch with

    @property
    def prompt(self) -> str:
        return self.engine.prompt

    def set_prompt(self, prompt: str) -> None:
        self.engine.set_prompt(prompt)

    def process(self, frames: list[np.ndarray]) -> list[np.ndarray]:
        out = self.engine.process(frames)
        log_ = self.engine.batch_log  # bounded by EngineConfig.log_limit
        self.last_prompt = log_[-1].prompt if log_ else None
        return out

    def close(self) -> None:
        self.engine.close()


def engine_choice_options(fn):
    """--shared-engine/--no-shared-engine and --preset (serve/shared.py: choose_engine)."""
    import click

    fn = click.option("--preset", type=click.Choice(SHARED_PRESETS), default=None,
                      help="Settings of the shared engine: exact (fast TE, compiled, CUDA graphs; the default on "
                           "CUDA), paper, eager (nothing compiled; the default on CPU).")(fn)
    return click.option("--shared-engine/--no-shared-engine", "shared_engine", default=None,
                        help="One multi-stream engine batching every stream (the default), or an eager engine per "
                             "session taking turns on the model (--no-shared-engine).")(fn)


def engine_factory(models, steps: int = 1, lllite: str | None = None, te_size: int | None = None,
                   shared: bool = False, max_streams: int = 8, preset: str = "eager", batch_size: int = 4):
    """``factory(prompt, size) -> engine`` for :class:`streamedit.serve.session.Session`: an eager engine of
    its own per session, or with ``shared`` a stream of one :class:`SharedEngine` (``factory.build(size)``
    makes it before the first session, to prepare it; else the first session does). ``factory.close()``
    closes it, ``factory.report()`` is its engine's report, ``factory.error()`` why it stopped (or None)."""
    import threading

    state: dict = {}
    lock = threading.Lock()

    def build(size: int) -> SharedEngine:
        with lock:
            if "engine" not in state:
                state["engine"] = SharedEngine(models, size, steps=steps, lllite=lllite, te_size=te_size,
                                               max_streams=max_streams, batch_size=batch_size, preset=preset)
            return state["engine"]

    def factory(prompt: str, size: int) -> LiveEngine | SharedStream:
        if not shared:
            return LiveEngine(models, prompt, size, steps=steps, lllite=lllite, te_size=te_size or 512)
        engine = build(size)
        engine.start()  # no-op once running
        return SharedStream(engine, prompt, size)

    def error() -> str | None:
        engine = state.get("engine")
        err = engine.engine.error if engine is not None else None
        return None if err is None else f"the shared engine stopped: {type(err).__name__}: {err}"[:300]

    def close() -> None:
        if "engine" in state:
            state.pop("engine").close()

    factory.build, factory.close, factory.error = build, close, error
    factory.shared = lambda: state.get("engine")  # the SharedEngine once built
    factory.report = lambda: state["engine"].engine.report() if "engine" in state else None
    factory.is_shared, factory.preset = shared, preset if shared else "eager"
    return factory


def start_engine(models, *, shared: bool | None = None, preset: str | None = None, steps: int = 1,
                 lllite: str | None = None, te_size: int | None = None, size: int = 256, max_batch: int = 8,
                 frame_sizes=((480, 640),), max_sessions: int | None = None, target_fps: float = 24.0, echo=print):
    """What `serve` runs before its port opens (and what a benchmark of it should run): the engine
    :func:`~streamedit.serve.shared.choose_engine` picks; the shared one built, compiled, every bucket's
    graphs captured for the working size of each ``frame_sizes`` (h, w) at ``size``, and on CUDA its
    batches timed. Returns the session factory and the session limit: ``max_sessions``, else on CUDA
    :func:`~streamedit.engine.multistats.capacity` of the measured times at ``target_fps``, else 2.
    ``te_size`` None: the preset's (512 unless it says otherwise)."""
    from ..engine.multistats import capacity
    from .shared import CPU_MAX_SESSIONS, choose_engine, describe_prepared

    cuda = models.device.type == "cuda"
    choice = choose_engine(cuda, shared, preset)
    kind = "one shared multi-stream engine" if choice.shared else "an eager engine per session"
    echo(f"engine: {kind}, preset {choice.preset} ({choice.why})")
    factory = engine_factory(models, steps=steps, lllite=lllite, te_size=te_size, shared=choice.shared,
                             preset=choice.preset, batch_size=max_batch)
    if not choice.shared:
        return factory, max_sessions or CPU_MAX_SESSIONS
    engine = factory.build(size)
    try:
        prepared = engine.prepare(list(frame_sizes), size, measure=5 if cuda else 0)
    except BaseException:
        factory.close()
        raise
    for done in prepared:
        echo(describe_prepared(done, engine.engine.buckets))
    if max_sessions is None and cuda:
        h, w = prepared[0]["shape"]
        max_sessions = capacity(prepared[0]["batch_s"], target_fps)
        echo(f"max sessions: {max_sessions} (each >= {target_fps:g} fps at {w}x{h} by the measured batch times; "
             "--max-sessions overrides)")
    max_sessions = max_sessions or CPU_MAX_SESSIONS
    engine.engine.max_streams = 2 * max_sessions  # the server admits; room for streams of sessions still closing
    engine.start()
    return factory, max_sessions
