"""streamedit: real-time video stylization with an instruction-edit diffusion model.

The public API, imported on first use: ``import streamedit`` (and so ``streamedit --help`` and every
CLI command) does not pay for the engine's imports, 7.3 s on the H100 host, diffusers most of it
(docs/results/h100-importtime-2026-11-24i-pyc.txt).
"""

import importlib

from . import _compat
from .errors import StreameditError

_compat.install()
_API = {"load_models": "streamedit.models", "Models": "streamedit.models", "StreamEngine": "streamedit.engine",
        "EngineConfig": "streamedit.config", "LOW_LATENCY": "streamedit.config", "PRESETS": "streamedit.config"}
__all__ = ["load_models", "Models", "StreamEngine", "EngineConfig", "LOW_LATENCY", "PRESETS", "StreameditError"]
__version__ = "0.1.0"


def __getattr__(name: str):
    if name not in _API:
        raise AttributeError(f"module 'streamedit' has no attribute {name!r}")
    value = getattr(importlib.import_module(_API[name]), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted({*globals(), *_API})
