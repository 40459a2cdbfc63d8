"""Model loading and per-session engines for the live commands (`serve`, `live`)."""

from __future__ import annotations

import copy
import dataclasses
import logging
import threading

import numpy as np

from ..config import EngineConfig
from ..errors import StreameditError

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


class SharedStream:
    """A session's stream of one shared :class:`~streamedit.engine.multi.MultiStreamEngine`, with
    :class:`LiveEngine`'s interface. ``concurrent``: the session calls :meth:`process` without the server's
    engine lock, so that the engine's thread batches the sessions' frames together."""

    concurrent = True

    def __init__(self, shared: "SharedEngine", prompt: str, size: int):
        self.shared = shared
        self.stream = shared.engine.open_stream(prompt, size=size)
        self.last_prompt: str | None = None

    @property
    def prompt(self) -> str:
        return self.stream.prompt

    def set_prompt(self, prompt: str) -> None:
        self.stream.set_prompt(prompt)

    def process(self, frames: list[np.ndarray]) -> list[np.ndarray]:
        """Each frame's output, in order (the session sends one frame at a time: nothing is dropped here)."""
        outs = []
        for frame in frames:
            index = self.stream.submit(frame)
            self.last_prompt = self.stream.prompt  # a tick takes it with the prompt it has now
            outs.append(self.shared.wait(self.stream, index))
        return outs

    def close(self) -> None:
        self.stream.close()


class SharedEngine:
    """One multi-stream engine for every session (``engine_factory(shared=True)``): one model, no U-Net
    copies with an adapter, sessions batched together instead of taking turns on the engine lock."""

    def __init__(self, models, size: int, steps: int = 1, lllite: str | None = None, te_size: int = 512,
                 max_streams: int = 8, batch_size: int = 4):
        from ..engine.multi import MultiStreamEngine  # torch, diffusers: not for `streamedit serve --help`

        config = EngineConfig(prompt="oil painting", batch_size=batch_size, steps=steps, size=size, fixed_noise=True,
                              te_size=te_size, lllite=lllite)
        self.engine = MultiStreamEngine(models, config, max_streams=max_streams)
        self.engine.start()

    def wait(self, stream, index: int, timeout: float = 300.0) -> np.ndarray:
        """The output of frame ``index`` of ``stream``; raises if the engine stopped or it never came."""
        import queue
        import time

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.engine.error is not None:
                raise StreameditError(f"the shared engine stopped: {self.engine.error}")
            try:
                out = stream.get(timeout=0.5)
            except queue.Empty:
                continue
            if out.index == index:
                return out.image
        raise StreameditError(f"no output for frame {index} within {timeout:.0f} s")

    def close(self) -> None:
        self.engine.close()


def engine_factory(models, steps: int = 1, lllite: str | None = None, te_size: int = 512, shared: bool = False,
                   max_streams: int = 8):
    """``factory(prompt, size) -> engine`` for :class:`streamedit.serve.session.Session`: an engine of its own
    per session, or with ``shared`` a stream of one :class:`SharedEngine` (built by the first session;
    ``factory.close()`` closes it)."""
    state: dict = {}
    lock = threading.Lock()

    def factory(prompt: str, size: int) -> LiveEngine | SharedStream:
        if not shared:
            return LiveEngine(models, prompt, size, steps=steps, lllite=lllite, te_size=te_size)
        with lock:
            if "engine" not in state:
                state["engine"] = SharedEngine(models, size, steps=steps, lllite=lllite, te_size=te_size,
                                               max_streams=max_streams)
        return SharedStream(state["engine"], prompt, size)

    def close() -> None:
        if "engine" in state:
            state.pop("engine").close()

    factory.close = close
    factory.shared = lambda: state.get("engine")  # the SharedEngine once a session built it
    return factory
