"""streamedit: real-time video stylization with an instruction-edit diffusion model."""

__all__ = ["load_models", "Models", "StreamEngine", "EngineConfig", "StreameditError"]
__version__ = "0.1.0"

# Imported on first use: `streamedit.cli` starts (and installs its Ctrl-C / SIGTERM handling) before
# torch, diffusers and transformers are imported, so an interrupt during those imports is handled too.
_LAZY = {"load_models": "models", "Models": "models", "StreamEngine": "engine", "EngineConfig": "engine",
         "StreameditError": "errors"}


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'streamedit' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted({*globals(), *__all__})
