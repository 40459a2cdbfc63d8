"""Build or load the engine's LLLite adapter from its temporal options (``EngineConfig.temporal``) and
patch it into the U-Net (before anything is compiled)."""

from __future__ import annotations

import torch

from ..config import TemporalOptions
from ..errors import StreameditError
from ..models.loading import DEMO_LLLITE
from .adapter import LLLiteAdapter, apply_lllite


def attach_adapter(models, options: TemporalOptions, cond_size: int = 512):
    """Load/build the LLLite adapter and patch it into the U-Net (before compile); the engine sizes its
    buffers for the working size (``adapter.allocate``). ``cond_size``: a random adapter's cond resolution."""
    if options.lllite is None:
        return None

    if isinstance(options.lllite, LLLiteAdapter):
        adapter = options.lllite
    elif options.lllite == "random":  # speed work: real shapes, small random weights
        adapter = LLLiteAdapter.for_unet(models.unet, hooks=options.hooks or "down", cond_size=cond_size)
        with torch.no_grad():
            for _, module in adapter.items():
                module.up[0].weight.normal_(0, 1e-3)
    else:
        adapter = LLLiteAdapter.load(adapter_path(options.lllite), models.unet, hooks=options.hooks)
    apply_lllite(models.unet, adapter, inference_mode=True)
    adapter.set_multiplier(options.lllite_multiplier)
    return adapter


def adapter_path(lllite):
    """An adapter checkpoint's path: ``lllite`` itself, or the bundled file for ``"demo"``."""
    if lllite != "demo":
        return lllite
    if not DEMO_LLLITE.is_file():
        raise StreameditError("--lllite demo: the bundled demo adapter is not installed "
                              f"(expected {DEMO_LLLITE})")
    return DEMO_LLLITE
