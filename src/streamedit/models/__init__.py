"""DreamLite-mobile + Qwen3-VL: the components (``components.py``), loading from the hub, a folder or
the bundled demo (``loading.py``), the published and small architectures with random weights
(``architectures.py``) and the Qwen3-VL processor/tokenizer plumbing (``processor.py``)."""

from .architectures import ARCHITECTURES, DEMO_UNET, REAL_TE_TEXT, REAL_TE_VISION, REAL_UNET, TINY_UNET, build_random
from .components import COMPONENTS, Models
from .loading import (DEMO_LLLITE, DEMO_PATH, DREAMLITE_HUB_ID, DREAMLITE_REVISION, default_strength, demo_available,
                      describe, load_models, native_size, warn_unknown_instruction, working_size)

_MOVED = {"hook_sites": "streamedit.temporal.hooks", "hook_split": "streamedit.temporal.hooks",
          "HOOK_RE": "streamedit.temporal.hooks"}


def __getattr__(name: str):  # names 0.1 had here (deprecated)
    if name in _MOVED:
        import importlib

        from .. import _compat

        _compat.deprecated(f"streamedit.models.{name}", f"{_MOVED[name]}.{name}")
        return getattr(importlib.import_module(_MOVED[name]), name)
    raise AttributeError(f"module 'streamedit.models' has no attribute {name!r}")
