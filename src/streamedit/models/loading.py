"""Loading DreamLite-mobile + Qwen3-VL: hub ids, local diffusers folders and random builds.

``load_models(source)`` returns :class:`Models`, whose attributes carry the component names of
diffusers' ``DreamLiteMobilePipeline`` (text_encoder, tokenizer, processor, vae, unet, scheduler).
Sources:

* a hub id (``carlofkl/DreamLite-mobile``, revision ``diffusers``) or a local diffusers folder:
  loaded through ``DreamLiteMobilePipeline.from_pretrained``, the path every real user takes;
* ``random:real``: the published architectures with random weights, for speed work;
* ``random:tiny``: the same classes at toy sizes, for tests; ``random:demo``: the demo model's architecture.
"""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path

import torch
from diffusers import DreamLiteMobilePipeline, FlowMatchEulerDiscreteScheduler

from ..errors import StreameditError
from . import processor as proc
from .architectures import ARCHITECTURES, build_random
from .components import COMPONENTS, TE_FEATURES, Models

log = logging.getLogger(__name__)

DREAMLITE_HUB_ID = "carlofkl/DreamLite-mobile"
DREAMLITE_REVISION = "diffusers"
DEMO_PATH = Path(__file__).parents[1] / "assets" / "demo-model"
DEMO_LLLITE = Path(__file__).parents[1] / "assets" / "demo-lllite.safetensors"  # the demo model's temporal adapter


def demo_available() -> bool:
    return (DEMO_PATH / "model_index.json").is_file()


def load_models(source: str = "random:tiny", device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                revision: str | None = None) -> Models:
    """Load or build the model components on ``device`` in ``dtype`` (see module docstring)."""
    device = torch.device(device)
    if source.startswith("random:") and source[7:] in ARCHITECTURES:
        models = build_random(source[7:], device=device, dtype=dtype)
    elif source == "demo":
        if not demo_available():
            raise StreameditError("the bundled demo model is not installed in this copy of streamedit")
        models = _from_pretrained(str(DEMO_PATH), device, dtype, None)
    elif source.startswith("random:"):
        raise StreameditError(f"unknown model source {source!r}: random builds are "
                              + ", ".join(f"'random:{a}'" for a in ARCHITECTURES))
    else:
        models = _from_pretrained(source, device, dtype, revision)
    models.source = source
    return models


def _from_pretrained(source: str, device: torch.device, dtype: torch.dtype, revision: str | None) -> Models:
    local = Path(source).expanduser()
    if not local.exists():
        if not re.fullmatch(r"[\w.-]+/[\w.-]+", source):
            raise StreameditError(f"unknown model source {source!r}: not a folder, not a hub id (owner/name), "
                                  "not 'random:real' / 'random:tiny' / 'random:demo' / 'demo'")
        if revision is None and source == DREAMLITE_HUB_ID:
            revision = DREAMLITE_REVISION
        local = Path(_hub_snapshot(source, revision))
    # Hub ids and folders load through the same code from here on.
    _check_folder(local)
    source = str(local)
    try:
        # Loaded separately so that machines without torchvision get the image-only processor;
        # with torchvision this is the stock Qwen3VLProcessor of the checkpoint.
        processor = _load_processor(source)
        pipe = DreamLiteMobilePipeline.from_pretrained(source, dtype=dtype, processor=processor)
    except StreameditError:
        raise
    except Exception as exc:  # hub/network/format errors: one clear line for the user
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise StreameditError(f"could not load model {source!r}: {first}") from exc
    check_scheduler(pipe.scheduler)
    pipe.to(device)
    tok = pipe.tokenizer
    # Upstream's 64 is exact for the Qwen tokenizer; other tokenizers are measured.
    prefix = proc.QWEN_EDIT_PREFIX_LEN if len(tok) > 150_000 else proc.edit_prefix_len(tok)
    extras = {}
    meta = local / "streamedit.json"  # written by `streamedit train base`: instructions the model knows
    if meta.is_file():
        try:
            extras = json.loads(meta.read_text())
        except ValueError:
            log.warning("ignoring unreadable %s", meta)
    features = extras.get("te_features", "prenorm")
    if features not in TE_FEATURES:
        raise StreameditError(f"{meta}: te_features must be one of {', '.join(TE_FEATURES)}, got {features!r}")
    return Models(**{c: getattr(pipe, c) for c in COMPONENTS}, source=source, edit_prefix_len=prefix,
                  te_features=features, extras=extras)


def check_scheduler(scheduler) -> None:
    """Refuse a scheduler whose steps diffusion/denoiser.py's written-out Euler step does not reproduce.

    The sigmas and timesteps always come from the scheduler's own ``set_timesteps`` (time-shift type,
    Karras / exponential / beta spacing and ``shift_terminal`` included), and the step
    ``x + (s_next - s) * v`` equals ``scheduler.step`` for them (tests/test_scheduler.py). Not for
    ``stochastic_sampling`` (re-noises every step), ``invert_sigmas`` (sigmas run 0 -> 1: the start
    from noise and the strength start assume 1 = noise) or another scheduler class.
    """
    name = type(scheduler).__name__
    if not isinstance(scheduler, FlowMatchEulerDiscreteScheduler):
        raise StreameditError(f"scheduler {name} is not supported: streamedit's denoising loop is "
                              "FlowMatchEulerDiscreteScheduler's Euler step")
    cfg = scheduler.config
    for key in ("stochastic_sampling", "invert_sigmas"):
        if cfg.get(key, False):
            raise StreameditError(f"scheduler config {key}=true is not supported: streamedit's Euler step "
                                  "(diffusion/denoiser.py) reproduces only the deterministic flow-matching step from sigma 1")


def default_strength(models: Models) -> float:
    """The start sigma a model folder's ``streamedit.json`` names (the demo model has one), else 1."""
    return float((models.extras or {}).get("strength", 1.0))


def working_size(size: int | None, source: str) -> int:
    """``size`` if given, else the model's native size (:func:`native_size`), else 512."""
    return size if size is not None else native_size(source) or 512


def native_size(source: str) -> int | None:
    """The working size a model folder's ``streamedit.json`` names (the demo model: 256), read without
    loading the model; None for hub ids, ``random:*`` and folders without one."""
    folder = DEMO_PATH if source == "demo" else Path(source).expanduser()
    meta = folder / "streamedit.json"
    try:
        size = json.loads(meta.read_text()).get("size") if meta.is_file() else None
    except (OSError, ValueError):
        return None
    return int(size) if isinstance(size, int) else None


def _load_processor(source: str):
    """The checkpoint's processor; folders saved without a video processor (streamedit's own, on any
    machine) load as the image-only one even where torchvision would allow the stock class."""
    try:
        return proc.processor_class().from_pretrained(source, subfolder="processor")
    except Exception:  # e.g. OSError: no video_preprocessor_config.json
        if proc.processor_class() is proc.ImageOnlyQwen3VLProcessor:
            raise
        return proc.ImageOnlyQwen3VLProcessor.from_pretrained(source, subfolder="processor")


def warn_unknown_instruction(models: Models, prompt: str) -> bool:
    """Warn (once per call) when a model that lists its instructions gets another one; True if warned."""
    known = models.extras.get("instructions") if models.extras else None
    if not known or prompt.strip().lower() in {k.lower() for k in known}:
        return False
    log.warning("this model was trained on these instructions only: %s (got %r)", ", ".join(known), prompt)
    return True


def _hub_snapshot(repo: str, revision: str | None) -> str:
    """Local folder of a hub model: the cache if it has it, else a download (fails fast offline)."""
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(repo, revision=revision, local_files_only=True)
    except Exception:
        pass
    if os.environ.get("HF_HUB_OFFLINE") not in (None, "", "0") or not _hub_reachable():
        raise StreameditError(f"model {repo!r} is not in the local Hugging Face cache and the hub cannot be "
                              "reached: download it on a connected machine, or pass a local folder")
    try:
        return snapshot_download(repo, revision=revision)
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise StreameditError(f"could not download model {repo!r}: {first}") from exc


def _hub_reachable(timeout: float = 5.0) -> bool:
    """A TCP connect to the hub endpoint, bounded in time (DNS included), so offline runs fail fast."""
    import socket
    import threading
    from urllib.parse import urlparse

    from huggingface_hub import constants

    url = urlparse(constants.ENDPOINT)
    result = []

    def probe():
        try:
            socket.create_connection((url.hostname, url.port or 443), timeout=timeout).close()
            result.append(True)
        except OSError:
            pass

    worker = threading.Thread(target=probe, daemon=True)
    worker.start()
    worker.join(timeout)
    return bool(result)


def _check_folder(path: Path) -> None:
    if not path.is_dir():
        raise StreameditError(f"model folder {str(path)!r} is not a directory")
    if not (path / "model_index.json").is_file():
        raise StreameditError(f"model folder {str(path)!r} has no model_index.json (not a diffusers pipeline folder)")
    missing = [c for c in COMPONENTS if not (path / c).is_dir()]
    if missing:
        raise StreameditError(f"model folder {str(path)!r} is missing component(s): {', '.join(missing)}")


def describe(source: str, revision: str | None = None) -> list[tuple[str, str, int]]:
    """(component, class, parameter count) rows; random builds are made on the meta device."""
    device = "meta" if source.startswith("random:") else "cpu"
    models = load_models(source, device=device, dtype=torch.float32 if device == "cpu" else torch.bfloat16,
                         revision=revision)
    rows = []
    for name in COMPONENTS:
        comp = getattr(models, name)
        n = sum(p.numel() for p in comp.parameters()) if isinstance(comp, torch.nn.Module) else 0
        rows.append((name, type(comp).__name__, n))
    return rows, models
