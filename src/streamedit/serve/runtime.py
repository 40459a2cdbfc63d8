"""Model loading and per-session engines for the live commands (`serve`, `live`)."""

from __future__ import annotations

import dataclasses
import logging

import numpy as np

from ..errors import StreameditError

log = logging.getLogger(__name__)
DEFAULT_MODEL = "carlofkl/DreamLite-mobile"


def resolve_device(device: str, dtype: str):
    import torch

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise StreameditError(f"--device {device}: no CUDA GPU is visible to torch (use --device cpu)")
    if dtype == "auto":
        dtype = "bfloat16" if device.startswith("cuda") else "float32"
    try:
        torch_dtype = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[dtype]
    except KeyError:
        raise StreameditError(f"--dtype must be auto, float32, float16 or bfloat16, got {dtype!r}") from None
    return device, torch_dtype


def load_runtime(model: str, device: str = "auto", dtype: str = "auto", lllite: str | None = None):
    """(models, adapter or None): the shared model every session's engine runs on."""
    from .. import load_models

    device, torch_dtype = resolve_device(device, dtype)
    models = load_models(model, device=device, dtype=torch_dtype)
    adapter = None
    if lllite:
        from ..lllite import LLLiteAdapter, apply_lllite

        adapter = LLLiteAdapter.load(lllite, models.unet).to(models.device, models.dtype)
        apply_lllite(models.unet, adapter)
    return models, adapter


class LiveEngine:
    """A low-latency ``StreamEngine`` (batch 1, no pipelining, fixed noise) plus the LLLite cond image."""

    def __init__(self, models, prompt: str, size: int, steps: int = 1, adapter=None, seed: int = 0):
        from .. import EngineConfig, StreamEngine

        config = EngineConfig(prompt=prompt, batch_size=1, steps=steps, size=size, seed=seed, fixed_noise=True,
                              pipeline=False, prefetch=0)
        if adapter is not None and "lllite" in {f.name for f in dataclasses.fields(EngineConfig)}:
            config = dataclasses.replace(config, lllite=adapter)  # the engine knows LLLite itself
            adapter = None
        self.engine = StreamEngine(models, config)
        self.adapter = adapter
        self.last_prompt: str | None = None  # the prompt the engine encoded the latest batch with

    @property
    def prompt(self) -> str:
        return self.engine.prompt

    def set_prompt(self, prompt: str) -> None:
        self.engine.set_prompt(prompt)

    def process(self, frames: list[np.ndarray]) -> list[np.ndarray]:
        if self.adapter is not None:  # the source frame is the control image
            import torch

            self.adapter.set_cond_image(torch.from_numpy(np.stack(frames)).permute(0, 3, 1, 2).contiguous())
        out = self.engine.process(frames)
        log_ = self.engine.batch_log
        self.last_prompt = log_[-1].get("prompt") if log_ else None
        del log_[:-1]  # a live session runs for hours: keep only the latest entry
        return out

    def close(self) -> None:
        self.engine.close()


def engine_factory(models, steps: int = 1, adapter=None):
    """``factory(prompt, size) -> engine`` for :class:`streamedit.serve.session.Session`."""

    def factory(prompt: str, size: int) -> LiveEngine:
        return LiveEngine(models, prompt, size, steps=steps, adapter=adapter)

    return factory
