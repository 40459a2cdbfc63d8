"""``EngineConfig`` (every engine option), its presets, the one validation and prompt policy, and the
``--set KEY=VALUE`` overrides bench and eval share.

Every command imports this module, so it imports only numpy and ``errors`` at module level: the checks
that need the model code (scheduler, TE views, FP8 device) import it inside ``validate``."""

from __future__ import annotations

import ast
import dataclasses
import logging
from dataclasses import dataclass, field, fields

import numpy as np

from .errors import StreameditError

log = logging.getLogger(__name__)


def _in(group: str, default=None):
    """A field of option group ``group`` (the views below)."""
    return field(default=default, metadata={"group": group})


@dataclass
class EngineConfig:
    """Every engine option, flat (``EngineConfig(prompt=..., te_fast=True)``, ``--set KEY=VALUE``, the
    compile-cache key and recorded bench rows all use the flat names), in five option groups that each
    component reads as one typed view: ``run``, ``text``, ``compiling``, ``schedule``, ``temporal``."""

    # run: what is made, at what size
    prompt: str = field(metadata={"group": "run"})
    batch_size: int = _in("run", 8)
    steps: int = _in("run", 1)  # distilled operating point; 1-4
    strength: float | None = _in("run")  # start sigma (diffusion/denoiser.py): 1 = pure noise; None: the model's
    size: int = _in("run", 512)  # long side of the working size (video/geometry.py: the short side keeps the aspect)
    crop: bool = _in("run", False)  # centre-crop frames to a square first (working size: size x size)
    frame_size: tuple[int, int] | None = _in("run")  # (height, width) of the input frames; None: the first frame's
    seed: int = _in("run", 0)
    fixed_noise: bool = _in("run", False)  # every frame starts from the same noise (upstream's draw for `seed`)
    # text: the text encoder (text/)
    te_batch_one: bool = _in("text", False)  # approximation: encode one frame per batch, broadcast
    te_refresh_every: int = _in("text", 1)  # approximation: reuse the TE output for N batches
    te_fast: bool = _in("text", False)  # static, sync-free TE (text/fast.py); compiled (+CUDA graph) with `compile`
    te_size: int = _in("text", 512)  # the TE's view of a frame: 512 = upstream (LANCZOS); 256 = the paper's (TE_VIEWS)
    te_fp8: bool = _in("text", False)  # approximation: the fast TE's Linears in FP8 (text/fp8.py); needs te_fast
    # schedule: how the host and the two CUDA streams run batches (engine/stream.py)
    pipeline: bool = _in("schedule", True)  # overlap TE/VAE-encode of batch k+1 with denoise/decode of batch k
    main_priority: bool = _in("schedule", False)  # main stream at high CUDA priority: the side stream fills gaps
    profile: bool = _in("schedule", False)  # per-component CUDA-event timings in `engine.batch_log`
    prefetch: int = _in("schedule", 2)  # batches prepared ahead on the host
    low_latency: bool = _in("schedule", False)  # hand a batch out as soon as it is done (engine.run)
    skip_similar: float | None = _in("schedule")  # re-emit the last output for frames this close (similarity.py)
    log_limit: int = _in("schedule", 4096)  # batch_log keeps the newest entries only (live sessions run for hours)
    # compiling: torch.compile, CUDA graphs, the compile cache (accel/)
    compile: bool = _in("compiling", False)  # U-Net (and the fast TE); with compile_vae: U-Net + decode as one graph
    compile_vae: bool | None = _in("compiling")  # VAE encode/decode compiled; None: same as `compile`
    compile_mode: str = _in("compiling", "reduce-overhead")
    compile_backend: str = _in("compiling", "inductor")  # e.g. "aot_eager" to trace without code generation (tests)
    channels_last: bool = _in("compiling", True)  # the compiled VAE runs a channels_last copy
    precompile: bool = _in("compiling", True)  # save compiled functions whole; a later launch loads them untraced
    warm_on_worker: bool = _in("compiling", True)  # loaded main graph: first call + capture on a thread
    # temporal: the LLLite adapter and its conditioning (temporal/): an LLLiteAdapter, a checkpoint path, "demo"
    # (the bundled adapter of the demo model) or "random"
    lllite: object = _in("temporal")
    hooks: str | list | None = _in("temporal")  # None: every hook in the adapter file; "down" for "random"
    lllite_multiplier: float = _in("temporal", 1.0)
    cond_refresh_every: int = _in("temporal", 8)  # rebuild the cond embedding every N batches, reuse it in between
    cut_refresh: bool = _in("temporal", True)  # a scene cut forces a cond (and TE) refresh on its batch
    motion_refresh: float | None = _in("temporal")  # refresh early when mean flow (px) since the last one exceeds this
    flow_size: int | None = _in("temporal")  # compute Farnebäck at this resolution (None: working size)
    cond_stagger: bool = _in("temporal", False)  # refresh B/N slots every batch instead of all B every N

    @property
    def vae_compiled(self) -> bool:
        return self.compile if self.compile_vae is None else self.compile_vae

    def _group(self, name: str) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self) if f.metadata["group"] == name}

    @property
    def run(self) -> RunOptions:
        return RunOptions(**self._group("run"))

    @property
    def text(self) -> TextOptions:
        return TextOptions(**self._group("text"))

    @property
    def schedule(self) -> ScheduleOptions:
        return ScheduleOptions(**self._group("schedule"))

    @property
    def compiling(self) -> CompileOptions:
        return CompileOptions(**self._group("compiling"))

    @property
    def temporal(self) -> TemporalOptions:
        return TemporalOptions(**self._group("temporal"))

    @classmethod
    def from_groups(cls, *groups) -> EngineConfig:
        """A config from option-group views (``EngineConfig.from_groups(config.run, TextOptions(...), ...)``);
        groups not given keep their defaults."""
        return cls(**{k: v for g in groups for k, v in dataclasses.asdict(g).items()})


# Typed, read-only views of the option groups (the field comments above say what each option does).
@dataclass(frozen=True)
class RunOptions:
    prompt: str
    batch_size: int = 8
    steps: int = 1
    strength: float | None = None
    size: int = 512
    crop: bool = False
    frame_size: tuple[int, int] | None = None
    seed: int = 0
    fixed_noise: bool = False


@dataclass(frozen=True)
class TextOptions:
    te_batch_one: bool = False
    te_refresh_every: int = 1
    te_fast: bool = False
    te_size: int = 512
    te_fp8: bool = False


@dataclass(frozen=True)
class ScheduleOptions:
    pipeline: bool = True
    main_priority: bool = False
    profile: bool = False
    prefetch: int = 2
    low_latency: bool = False
    skip_similar: float | None = None
    log_limit: int = 4096


@dataclass(frozen=True)
class CompileOptions:
    compile: bool = False
    compile_vae: bool | None = None
    compile_mode: str = "reduce-overhead"
    compile_backend: str = "inductor"
    channels_last: bool = True
    precompile: bool = True
    warm_on_worker: bool = True


@dataclass(frozen=True)
class TemporalOptions:
    lllite: object = None
    hooks: str | list | None = None
    lllite_multiplier: float = 1.0
    cond_refresh_every: int = 8
    cut_refresh: bool = True
    motion_refresh: float | None = None
    flow_size: int | None = None
    cond_stagger: bool = False


GROUPS = {"run": RunOptions, "text": TextOptions, "schedule": ScheduleOptions, "compiling": CompileOptions,
          "temporal": TemporalOptions}


# `--low-latency`: one frame per batch, everything compiled, one batch prepared ahead, and the
# latency-first schedule (engine.run: never waits for the next frame to hand out the current one).
LOW_LATENCY = dict(batch_size=1, te_fast=True, compile=True, prefetch=1, pipeline=True, low_latency=True)


# The prompt policy, in two entry points. A prompt the user typed (CLI, API) is cleaned and, if very long,
# truncated with a warning; one that arrives over the network (serve, live's stdin) is refused outright
# (ValueError, one line) unless it is a short single line of text.
MAX_PROMPT_CHARS = 2000  # what the engine encodes at most
MAX_NETWORK_PROMPT_CHARS = 500


def clean_prompt(prompt: str) -> str:
    """The prompt as the engine will use it; an empty one raises, an over-long one is truncated."""
    prompt = (prompt or "").strip()
    if not prompt:
        raise StreameditError("the prompt is empty: say what the edit should do, e.g. --prompt 'oil painting'")
    if len(prompt) > MAX_PROMPT_CHARS:
        log.warning("prompt is %d characters; truncated to %d", len(prompt), MAX_PROMPT_CHARS)
        prompt = prompt[:MAX_PROMPT_CHARS]
    return prompt


def check_prompt(prompt) -> str:
    """A prompt from the network: whitespace collapsed, or ValueError with a one-line reason."""
    if not isinstance(prompt, str):
        raise ValueError("prompt must be a string")
    prompt = " ".join(prompt.split())
    if not prompt:
        raise ValueError("prompt is empty")
    if len(prompt) > MAX_NETWORK_PROMPT_CHARS:
        raise ValueError(f"prompt is longer than {MAX_NETWORK_PROMPT_CHARS} characters")
    if any(ord(c) < 32 for c in prompt):
        raise ValueError("prompt contains control characters")
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


# Named option bundles (`--preset`; the bench rows of the same names, docs/benchmarks.md):
#   exact: every speed-up that keeps upstream's arithmetic (the bench's `best` row): static compiled and
#          CUDA-graphed TE, U-Net + VAE decode one compiled graph, compiled VAE encode, the main stream at
#          high priority; for the adapter, its cond refresh spread over the batches and flow at 256 px;
#   paper: the streaming paper's recipe (its TE view: 256x256 BILINEAR, padded; TE and VAE eager, the U-Net
#          compiled with reduce-overhead);
#   max:   exact plus the approximations (the paper's TE view, the TE once per 8 batches on one frame);
#   low-latency: one frame per batch, handed out as soon as it is done;
#   eager: nothing compiled (the default on CPU, and for short jobs on a cold compile cache).
EXACT = dict(te_fast=True, compile=True, compile_vae=True, main_priority=True, cond_stagger=True, flow_size=256)
PRESETS = {
    "exact": EXACT,
    "paper": dict(te_size=256, te_fast=False, compile=True, compile_vae=False, compile_mode="reduce-overhead"),
    "max": dict(EXACT, te_size=256, te_refresh_every=8, te_batch_one=True),
    "low-latency": dict(LOW_LATENCY, compile_vae=True),
    "eager": dict(te_fast=False, compile=False, compile_vae=False),
}
