"""Old module paths, kept for one release (0.2): the 0.1 layout had every module at the package root.

``import streamedit.lllite``, ``from streamedit.te_fast import FastTextEncoderRunner`` and
``from streamedit import compile_cache`` still work, with a DeprecationWarning naming the new path.
A module that moved whole is the same module object under both names (attributes, identity and
monkeypatching agree); one whose names went to several homes is a read-only proxy that looks each
name up in its new modules, in order. Old names that are packages now (engine, models, temporal,
bench, cli) need nothing here: their ``__init__`` re-exports what the old module offered.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
import types
import warnings

REMOVED_IN = "0.3"
# old module -> its new home(s); names are looked up in this order
MOVED = {
    "streamedit.engine_config": ("streamedit.config", "streamedit.engine.host", "streamedit.temporal.attach"),
    "streamedit.similarity": ("streamedit.engine.similarity",),
    "streamedit.processor": ("streamedit.models.processor",),
    "streamedit.text_encoder": ("streamedit.text.exact", "streamedit.config"),
    "streamedit.te_fast": ("streamedit.text.fast",),
    "streamedit.fp8": ("streamedit.text.fp8", "streamedit.text.fast"),
    "streamedit.denoise": ("streamedit.diffusion.denoiser",),
    "streamedit.graphs": ("streamedit.accel.graphs",),
    "streamedit.compile_cache": ("streamedit.accel.compile_cache",),
    "streamedit.kernels": ("streamedit.accel.kernels",),
    "streamedit.lllite": ("streamedit.temporal.adapter", "streamedit.temporal.hooks"),
    "streamedit.lllite_io": ("streamedit.temporal.checkpoint",),
    "streamedit.lllite_cond": ("streamedit.temporal.cond",),
    "streamedit.io": ("streamedit.video.io",),
    "streamedit.clips": ("streamedit.video.clips",),
    "streamedit.geometry": ("streamedit.video.geometry",),
    "streamedit.bench_run": ("streamedit.bench.run",),
    "streamedit.bench_report": ("streamedit.bench.report", "streamedit.telemetry", "streamedit.cli.options"),
    "streamedit.bench_startup": ("streamedit.bench.startup",),
}


def deprecated(old: str, new: str) -> None:
    """Warn once per call site, pointing at the first frame outside the import machinery and this file."""
    frame, level = sys._getframe(1), 2
    while frame is not None and (frame.f_code.co_filename.startswith("<frozen")
                                 or frame.f_code.co_filename in (__file__, importlib.__file__)):
        frame, level = frame.f_back, level + 1
    warnings.warn(f"{old} moved to {new}; the old path goes in streamedit {REMOVED_IN}", DeprecationWarning,
                  stacklevel=level)


class _Proxy(types.ModuleType):
    """An old module whose names now live in several modules."""

    def __init__(self, name: str, homes: tuple[str, ...]):
        super().__init__(name, f"Moved: see {', '.join(homes)}.")
        self.__dict__["_homes"] = homes

    def __getattr__(self, attr: str):
        for home in self._homes:
            module = importlib.import_module(home)
            if hasattr(module, attr):
                return getattr(module, attr)
        raise AttributeError(f"module {self.__name__!r} has no attribute {attr!r} (moved to {self._homes[0]})")

    def __dir__(self):
        return sorted({n for h in self._homes for n in dir(importlib.import_module(h))})


class _Finder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, name, path=None, target=None):
        return importlib.machinery.ModuleSpec(name, self) if name in MOVED else None

    def create_module(self, spec):
        homes = MOVED[spec.name]
        deprecated(spec.name, homes[0])
        return importlib.import_module(homes[0]) if len(homes) == 1 else _Proxy(spec.name, homes)

    def exec_module(self, module):
        pass  # already executed under its new name


def install() -> None:
    if not any(isinstance(f, _Finder) for f in sys.meta_path):
        sys.meta_path.append(_Finder())
