"""Build or load the engine's LLLite adapter from :class:`streamedit.config.EngineConfig` and patch it into the U-Net (before anything is compiled)."""

from __future__ import annotations

import torch

from ..config import EngineConfig
from ..errors import StreameditError
from ..models.loading import DEMO_LLLITE
from .adapter import LLLiteAdapter, apply_lllite


def attach_adapter(models, config: EngineConfig):
    """Load/build the LLLite adapter and patch it into the U-Net (before compile); the engine sizes its
    buffers for the working size (``adapter.allocate``)."""
    if config.lllite is None:
        return None

    if isinstance(config.lllite, LLLiteAdapter):
        adapter = config.lllite
    elif config.lllite == "random":  # speed work: real shapes, small random weights
        adapter = LLLiteAdapter.for_unet(models.unet, hooks=config.hooks or "down", cond_size=config.size)
        with torch.no_grad():
            for _, module in adapter.items():
                module.up[0].weight.normal_(0, 1e-3)
    else:
        adapter = LLLiteAdapter.load(adapter_path(config.lllite), models.unet, hooks=config.hooks)
    apply_lllite(models.unet, adapter, inference_mode=True)
    adapter.set_multiplier(config.lllite_multiplier)
    return adapter


def adapter_path(lllite):
    """An adapter checkpoint's path: ``lllite`` itself, or the bundled file for ``"demo"``."""
    if lllite != "demo":
        return lllite
    if not DEMO_LLLITE.is_file():
        raise StreameditError("--lllite demo: the bundled demo adapter is not installed "
                              f"(expected {DEMO_LLLITE})")
    return DEMO_LLLITE
