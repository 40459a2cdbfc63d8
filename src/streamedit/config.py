"""``EngineConfig`` (every engine option), its presets, the one validation and prompt policy, and the
``--set KEY=VALUE`` overrides bench and eval share.

Every command imports this module, so it imports only numpy and ``errors`` at module level: the checks
that need the model code (scheduler, TE views, FP8 device) import it inside ``validate``."""

from __future__ import annotations

import ast
import dataclasses
import logging
from dataclasses import dataclass

import numpy as np

from .errors import StreameditError

log = logging.getLogger(__name__)


@dataclass
class EngineConfig:
    prompt: str
    batch_size: int = 8
    steps: int = 1  # distilled operating point; 1-4
    strength: float | None = None  # start sigma (diffusion/denoiser.py): 1 = pure noise; None: the model's default
    size: int = 512  # long side of the working size (video/geometry.py: the short side keeps the input's aspect)
    crop: bool = False  # centre-crop frames to a square first (working size: size x size)
    frame_size: tuple[int, int] | None = None  # (height, width) of the input frames; None: the first frame's
    seed: int = 0
    fixed_noise: bool = False  # every frame starts from the same noise (upstream's draw for `seed`)
    te_batch_one: bool = False  # approximation: encode one frame per batch, broadcast
    te_refresh_every: int = 1  # approximation: reuse the TE output for N batches
    te_fast: bool = False  # static, sync-free TE (text/fast.py); compiled (+CUDA graph) with `compile`
    te_size: int = 512  # the TE's view of a frame: 512 = upstream (LANCZOS); 256 = the paper's (text/exact.py TE_VIEWS)
    te_fp8: bool = False  # approximation: the fast TE's Linears in FP8 (text/fp8.py); needs te_fast + an FP8 GPU
    pipeline: bool = True  # overlap TE/VAE-encode of batch k+1 with denoise/decode of batch k
    main_priority: bool = False  # main stream (U-Net + decode) at high CUDA priority: the side stream fills gaps
    compile: bool = False  # U-Net (and the fast TE); with compile_vae: U-Net + decode as one graph
    compile_vae: bool | None = None  # VAE encode/decode compiled; None: same as `compile`
    compile_mode: str = "reduce-overhead"
    compile_backend: str = "inductor"  # e.g. "aot_eager" to trace without code generation (tests)
    channels_last: bool = True  # the compiled VAE runs a channels_last copy
    precompile: bool = True  # save compiled functions whole; a later launch loads them untraced (compile_cache)
    warm_on_worker: bool = True  # loaded main graph: first call + capture on a thread beside the TE's loading
    profile: bool = False  # per-component CUDA-event timings in `engine.batch_log`
    prefetch: int = 2  # batches prepared ahead on the host
    low_latency: bool = False  # schedule: hand a batch out as soon as it is done (engine.run)
    skip_similar: float | None = None  # re-emit the last output for frames this close (engine/similarity.py)
    log_limit: int = 4096  # batch_log keeps the newest entries only (live sessions run for hours)
    # temporal LLLite adapter (see temporal/conditioner.py): an LLLiteAdapter, a checkpoint path, "demo" (the bundled
    # adapter of the demo model) or "random"
    lllite: object = None
    hooks: str | list | None = None  # None: every hook in the adapter file; "down" for "random"
    lllite_multiplier: float = 1.0
    cond_refresh_every: int = 8  # rebuild the cond embedding every N batches, reuse it in between
    cut_refresh: bool = True  # a scene cut forces a cond (and TE) refresh on its batch
    motion_refresh: float | None = None  # refresh early when mean flow (px) since the last refresh exceeds this
    flow_size: int | None = None  # compute Farnebäck at this resolution (None: working size)
    cond_stagger: bool = False  # refresh B/N batch slots every batch instead of all B every N (temporal/conditioner.py)

    @property
    def vae_compiled(self) -> bool:
        return self.compile if self.compile_vae is None else self.compile_vae


# `--low-latency`: one frame per batch, everything compiled, one batch prepared ahead, and the
# latency-first schedule (engine.run: never waits for the next frame to hand out the current one).
LOW_LATENCY = dict(batch_size=1, te_fast=True, compile=True, prefetch=1, pipeline=True, low_latency=True)


def clean_prompt(prompt: str) -> str:
    """The prompt as the engine will use it; an empty one raises, an over-long one is truncated."""
    prompt = (prompt or "").strip()
    if not prompt:
        raise StreameditError("the prompt is empty: say what the edit should do, e.g. --prompt 'oil painting'")
    if len(prompt) > MAX_PROMPT_CHARS:
        log.warning("prompt is %d characters; truncated to %d", len(prompt), MAX_PROMPT_CHARS)
        prompt = prompt[:MAX_PROMPT_CHARS]
    return prompt


def check_frame(frame) -> np.ndarray:
    frame = np.asarray(frame)
    if frame.ndim != 3 or frame.shape[2] != 3 or frame.dtype != np.uint8:
        raise StreameditError(f"frames must be HxWx3 uint8 RGB arrays, got shape {frame.shape} dtype {frame.dtype}")
    return frame


def engine_shape(models, config: EngineConfig, frame_size: tuple[int, int] | None = None) -> tuple[int, int] | None:
    """The working (h, w) for ``config`` and an input of ``frame_size`` (else ``config.frame_size``); None
    while it is unknown (no frame size yet, no crop)."""
    from .video.geometry import working_shape  # cv2: not for every command that imports config

    frame_size = frame_size or config.frame_size
    if frame_size is None and not config.crop:
        return None
    h, w = frame_size or (config.size, config.size)
    return working_shape(int(h), int(w), config.size, models.vae_scale_factor * 4, config.crop)


def model_strength(models, config: EngineConfig) -> float:
    """``config.strength``, else the default a model folder's ``streamedit.json`` names, else 1."""
    from .models.loading import default_strength

    return float(config.strength) if config.strength is not None else default_strength(models)


def validate(models, config: EngineConfig) -> None:
    import torch

    from .diffusion.denoiser import sigma_schedule
    from .models.loading import check_scheduler
    from .text.exact import TE_VIEWS

    check_scheduler(models.scheduler)
    if not 0.0 < model_strength(models, config) <= 1.0:
        raise StreameditError(f"--strength must be in (0, 1], got {config.strength}")
    if not 1 <= config.steps <= 4:
        raise StreameditError(f"--steps must be 1..4 for the distilled model, got {config.steps}")
    if config.batch_size < 1:
        raise StreameditError(f"--batch must be >= 1, got {config.batch_size}")
    if config.cond_refresh_every < 1:
        raise StreameditError(f"--cond-refresh must be >= 1, got {config.cond_refresh_every}")
    if config.te_refresh_every < 1:
        raise StreameditError(f"te_refresh_every must be >= 1, got {config.te_refresh_every}")
    if config.skip_similar is not None and not config.skip_similar >= 0:
        raise StreameditError(f"--skip-similar must be >= 0 (gray levels), got {config.skip_similar}")
    if config.te_size not in TE_VIEWS:
        raise StreameditError(f"--te-size must be one of {', '.join(map(str, sorted(TE_VIEWS)))}, got {config.te_size}")
    if config.te_fp8:
        from .text.fp8 import check_fp8_device

        if not config.te_fast:
            raise StreameditError("--te-fp8 needs --te-fast (FP8 runs inside the fast text encoder)")
        reason = check_fp8_device(models.device)
        if reason:
            raise StreameditError(reason)
    step = models.vae_scale_factor * 4  # the U-Net downsamples the latent twice
    if config.size <= 0:
        raise StreameditError(f"--size must be a positive number of pixels, got {config.size}")
    if config.size < step or config.size % step:
        raise StreameditError(f"--size must be a multiple of {step}, got {config.size}")
    fs = config.frame_size
    if fs is not None and (len(fs) != 2 or min(int(v) for v in fs) < 1):
        raise StreameditError(f"frame_size must be (height, width) in pixels, got {fs}")
    strength = model_strength(models, config)
    sigmas, _ = sigma_schedule(models, config.size, np.linspace(strength, strength / config.steps, config.steps))
    if not torch.isfinite(sigmas).all():  # e.g. shift_terminal with one step
        raise StreameditError(f"the model's scheduler gives a non-finite schedule for --steps {config.steps}: "
                              f"{[round(float(s), 4) for s in sigmas]}")


MAX_PROMPT_CHARS = 2000


# ------------------------------------------------------------------------------------------- config
def engine_fields() -> set[str]:

    return {f.name for f in dataclasses.fields(EngineConfig)}


def parse_sets(sets) -> dict:
    """``--set KEY=VALUE`` pairs -> EngineConfig overrides (values as Python literals, else strings)."""
    out, fields = {}, engine_fields()
    for item in sets:
        key, sep, raw = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not key:
            raise StreameditError(f"--set expects KEY=VALUE, got {item!r}")
        if key not in fields or key == "prompt":
            raise StreameditError(f"--set {key}: EngineConfig has no such field (fields: {', '.join(sorted(fields))})")
        try:
            out[key] = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            out[key] = raw
    return out


def build_config(base: dict, overrides: dict, forced: dict):
    """EngineConfig of base < row overrides < --set; returns (config, notes)."""

    fields, merged = engine_fields(), {**base, **overrides, **forced}
    notes = [f"engine has no {k!r}: runs without it" for k in merged if k not in fields and merged[k] is not None]
    return EngineConfig(**{k: v for k, v in merged.items() if k in fields}), notes


# named EngineConfig overrides (the CLI's --low-latency)
PRESETS = {"low_latency": LOW_LATENCY}
