"""The engine's model-side parts, built once per engine (text encoder) and once per working size (denoiser,
adapter buffers, compiled functions): shared by :class:`~streamedit.engine.stream.StreamEngine` and
:class:`~streamedit.engine.multi.MultiStreamEngine`, so both run the same compiled path."""

from __future__ import annotations

from ..accel import compile_cache
from ..accel.compile_main import compile_denoiser
from ..accel.compile_te import compile_te
from ..config import EngineConfig, model_strength
from ..diffusion.denoiser import Denoiser
from ..text.base import TextEncoder
from ..text.exact import TextEncoderRunner
from ..text.fast import FastTextEncoderRunner
from ..text.mixed import MixedPromptRunner


def text_encoder(models, config: EngineConfig, prompt_tokens: int | None = None,
                 rows: int | None = None) -> TextEncoder:
    """The exact runner, or the fast one with ``te_fast`` (compiled by :func:`build_denoiser`). With
    ``prompt_tokens`` (the multi-stream engine): one sequence length for every prompt and a prompt per row
    of up to ``rows`` rows (text/mixed.py)."""
    text = config.text
    if text.te_fast and prompt_tokens:
        return MixedPromptRunner(models, rows or config.batch_size, prompt_tokens, fp8=text.te_fp8,
                                 te_size=text.te_size)
    if text.te_fast:
        return FastTextEncoderRunner(models, config.batch_size, fp8=text.te_fp8, te_size=text.te_size)
    return TextEncoderRunner(models, te_size=text.te_size)


def build_denoiser(models, config: EngineConfig, shape: tuple[int, int], te: TextEncoder, adapter,
                   rows: int) -> tuple[Denoiser, str | None]:
    """Everything that depends on the working (h, w) or compiles under its cache key (one per working size):
    the text encoder's compile, the adapter's cond buffers for ``rows`` batch rows, the denoiser (latent
    shape, time_ids, shift) and its compiled graphs.

    Returns the denoiser and the compile-cache key whose inductor artifacts the caller saves after its
    first compiled batch (None: nothing to save)."""
    comp = config.compiling
    precompile_key = save_key = None
    if comp.compile or config.vae_compiled:
        compile_cache.setup()
        key = compile_cache.artifact_key(models, config, shape)
        if comp.precompile and comp.compile_backend in compile_cache.PRECOMPILE_BACKENDS:
            precompile_key = key  # whole functions on disk: inductor's mega-cache is not needed
        elif not compile_cache.load_artifacts(key):
            save_key = key
    if config.te_fast and comp.compile:
        compile_te(te, comp.compile_mode, backend=comp.compile_backend, cache_key=precompile_key)
    if adapter is not None:
        adapter.allocate(rows, *shape)  # before the U-Net is compiled
    denoiser = Denoiser(models, config.steps, shape, strength=model_strength(models, config))
    if comp.compile or config.vae_compiled:
        compile_denoiser(denoiser, comp.compile_mode, comp.compile_backend, unet=comp.compile,
                         vae=config.vae_compiled, channels_last=comp.channels_last, cache_key=precompile_key)
    return denoiser, save_key
