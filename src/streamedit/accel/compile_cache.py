"""Persistent torch.compile caches, so a second launch skips inductor's code generation.

* :func:`setup` (the engine calls it before compiling anything): unless ``TORCHINDUCTOR_CACHE_DIR``
  is set to a folder of the user's choosing (importing torch._dynamo sets it to torch's default,
  ``/tmp/torchinductor_$USER``, which counts as unset), inductor's cache (FX graphs, AOT autograd entries, Triton kernels; Triton's own
  cache lives under it unless ``TRITON_CACHE_DIR`` is set) goes to ``$STREAMEDIT_CACHE_DIR/inductor``
  (default ``~/.cache/streamedit/inductor``) instead of ``/tmp/torchinductor_$USER``, which does
  not survive a reboot. The FX graph and AOT autograd caches are switched on (unless an env var
  says otherwise).
* "Mega-cache" (``torch.compiler.save_cache_artifacts`` / ``load_cache_artifacts``): after the
  first compiled batch the engine saves every cache artifact this process produced to
  ``$STREAMEDIT_CACHE_DIR/mega/<key>.bin``, keyed by :func:`artifact_key` (torch version, device,
  model architecture, dtype and the config fields that change the graphs); the next engine with
  the same key loads it before compiling. The local cache alone already gives warm starts on
  this machine; the file is what can be copied to another one (same torch, same GPU model).

* :class:`Precompiled` (engine ``precompile=True``, the default, with inductor or aot_eager): the
  engine's compiled functions are saved whole, dynamo's output included, under
  ``$STREAMEDIT_CACHE_DIR/precompiled``; the next launch loads them without tracing any Python
  and the mega-cache is not used.

Nothing here changes results: a cache hit gives the same generated code as a fresh compile.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import os
import time
from pathlib import Path

import torch

from .graphs import compile_fn, mode_options

log = logging.getLogger(__name__)

ENV = "STREAMEDIT_CACHE_DIR"
# EngineConfig fields that change what is compiled (shapes, graphs, modes)
GRAPH_FIELDS = ("batch_size", "steps", "size", "te_size", "te_fast", "te_fp8", "te_batch_one", "compile", "compile_vae",
                "compile_mode", "compile_backend", "channels_last", "hooks")


def root() -> Path:
    return Path(os.environ.get(ENV) or Path.home() / ".cache" / "streamedit").expanduser()


def setup() -> str:
    """Point inductor at the persistent cache (if nobody chose a folder) and enable its caches."""
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    current = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    if not current or os.path.abspath(current) == os.path.abspath(default_cache_dir()):
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(root() / "inductor")
    import torch._functorch.config as functorch_config
    import torch._inductor.config as inductor_config

    if "TORCHINDUCTOR_FX_GRAPH_CACHE" not in os.environ:
        inductor_config.fx_graph_cache = True
    if "TORCHINDUCTOR_AUTOGRAD_CACHE" not in os.environ:
        functorch_config.enable_autograd_cache = True
    return os.environ["TORCHINDUCTOR_CACHE_DIR"]


def artifact_key(models, config, shape: tuple[int, int] | None = None) -> str:
    """A file-name-safe hash of everything the compiled code depends on (not the weight values);
    ``shape``: the working (h, w) (default: ``config.size`` square)."""
    device = models.device
    parts = {
        "torch": torch.__version__,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else device.type,
        "dtype": str(models.dtype),
        "unet": _public(models.unet.config), "vae": _public(models.vae.config),
        "te": models.text_encoder.config.to_json_string(use_diff=False), "te_features": models.te_features,
        "lllite": config.lllite is not None,
        "shape": list(shape or (config.size, config.size)),
        "config": {f.name: getattr(config, f.name) for f in dataclasses.fields(config) if f.name in GRAPH_FIELDS},
    }
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:24]


def _public(config) -> dict:
    """A diffusers config without its bookkeeping keys (``_use_default_values`` comes from a set)."""
    return {k: v for k, v in dict(config).items() if not k.startswith("_")}


def _mega_path(key: str) -> Path:
    return root() / "mega" / f"{key}.bin"


def is_warm(key: str) -> bool:
    """Whether a launch under ``key`` finds compiled code to load (saved functions or inductor's mega-cache)."""
    return any((root() / "precompiled").glob(f"{key}-*.bin")) or _mega_path(key).is_file()


def load_artifacts(key: str) -> bool:
    """Load a saved mega-cache into inductor's caches; False when there is none (or it is unusable)."""
    path = _mega_path(key)
    if not path.is_file() or not hasattr(torch.compiler, "load_cache_artifacts"):
        return False
    try:
        torch.compiler.load_cache_artifacts(path.read_bytes())
    except Exception as exc:  # a cache must never stop the engine: compile from scratch instead
        log.warning("ignoring compile cache %s: %s", path, exc)
        return False
    return True


def save_artifacts(key: str) -> bool:
    """Write this process's cache artifacts for ``key`` (atomically); False when there are none."""
    if not hasattr(torch.compiler, "save_cache_artifacts"):
        return False
    try:
        saved = torch.compiler.save_cache_artifacts()
        if not saved or not saved[0]:
            return False
        path = _mega_path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_bytes(saved[0])
        tmp.replace(path)
    except Exception as exc:
        log.warning("could not save the compile cache: %s", exc)
        return False
    return True


def cache_stats() -> dict:
    """Inductor's FX-graph / AOT-autograd cache hit and miss counters of this process."""
    from torch._dynamo.utils import counters

    return {k: int(v) for k, v in {**counters["inductor"], **counters["aot_autograd"]}.items()
            if "cache" in k and ("hit" in k or "miss" in k)}


# ---------------------------------------------------------------------------------------- precompile
STATS: dict[str, int] = {"loaded": 0, "compiled": 0, "fallback": 0, "stale": 0}
# "<how>:<name>" -> seconds spent getting a function for a new signature: loading or compiling the artifact
# (a fallback's torch.compile runs inside its first call, not here)
SECONDS: dict[str, float] = {}
# function name -> why it fell back to plain torch.compile, or why its saved artifact was not loaded
# ("<name> (compiled again)"); one line each, the startup report shows them
FALLBACKS: dict[str, str] = {}
PRECOMPILE_BACKENDS = ("inductor", "aot_eager")  # backends whose output aot_compile can serialise


def compiled(method, mode: str | None, backend: str, key: str | None, name: str, variant=None,
             inductor: dict | None = None, **options):
    """A :class:`Precompiled` ``method`` when ``key`` is given and ``backend`` can be serialised, else
    ``torch.compile(method, **options)`` (inductor's own caches only). ``inductor``: extra inductor options."""
    if key is not None and backend in PRECOMPILE_BACKENDS and hasattr(torch.compiler, "load_compiled_function"):
        return Precompiled(method, key, name, mode, backend, variant, inductor, **options)

    return compile_fn(method, mode, backend, inductor, **options)


# guards dynamo cannot write to disk (torch._dynamo.guards.CheckFunctionManager lists the same)
UNSERIALISABLE_GUARDS = frozenset(("DICT_VERSION", "NN_MODULE", "ID_MATCH", "FUNCTION_MATCH", "CLASS_MATCH",
                                   "MODULE_MATCH", "CLOSURE_MATCH", "WEAKREF_ALIVE"))


def serialisable_guards(entries, weights: dict | None = None) -> list[bool]:
    """Keep every guard that can be saved: tensor metadata, Python constants, types, global state.

    Dropped: guards on globals and identity guards (which code object a decorator wraps, which
    attention processor class a module calls). Identity is not stable across processes; what they
    protect against is the code changing, which the artifact's source checksums catch instead.

    With ``weights`` (a dict), the tensor guards on module parameters and buffers are dropped too and
    their metadata is written into it instead, by source name: :class:`Precompiled` checks it at load.
    Loading each saved tensor guard builds a fake tensor (and a stack trace with it): on the H100 host
    the ~2,200 of the three functions cost ~6 s under cProfile (docs/benchmarks.md, tenth session).
    """
    local = _local_class_modules(entries)
    keep = []
    for g in entries:
        ok = not (g.is_global or g.guard_type in UNSERIALISABLE_GUARDS
                  or UNSERIALISABLE_GUARDS.intersection(g.derived_guard_types)
                  or any(name in g.name for name in local))
        if ok and weights is not None and g.guard_type == "TENSOR_MATCH" and g.has_value and _is_weight(g):
            weights[g.name] = tensor_meta(g.value)
            ok = False
        keep.append(ok)
    return keep


def _local_class_modules(entries) -> set[str]:
    """Source names of modules whose class is not at module level: dynamo cannot write them to disk.

    transformers >= 5.25 (with its ``kernels`` dependency) turns ``apply_rotary_pos_emb`` into an
    instance of a class made inside a function (``kernels``' ``_create_func_module.<locals>.Func``)
    that every text attention layer holds and calls: with a guard on it (or on anything reached
    through it) the TE would not be saved at all. Such a module is code, not state: which one a
    layer holds is checked by the artifact's source checksums, like the identity guards dropped above.
    """
    return {g.name for g in entries if g.has_value and isinstance(g.value, torch.nn.Module)
            and type(g.value).__qualname__ != type(g.value).__name__}


def _is_weight(entry) -> bool:
    return isinstance(entry.value, torch.nn.Parameter) or "._buffers[" in entry.name


def tensor_meta(t: torch.Tensor) -> list:
    """What dynamo's TENSOR_MATCH guard compares, in JSON: shape, strides, dtype, device, requires_grad."""
    return [list(t.shape), list(t.stride()), str(t.dtype), str(t.device), bool(t.requires_grad)]


def weights_match(saved: dict, f_locals: dict) -> bool:
    """Each saved weight, looked up by its guard's source name in the call's locals, has its saved metadata."""
    for name, meta in saved.items():
        try:
            value = eval(name, {"__builtins__": {}}, f_locals)  # noqa: S307  (dynamo's own source names)
        except Exception:  # noqa: BLE001  (a module renamed or gone)
            return False
        if not isinstance(value, torch.Tensor) or tensor_meta(value) != meta:
            return False
    return True


def _source_sums(modules) -> dict[str, str]:
    """sha256 of each module's current source (empty when a module is gone or has no source file)."""
    return {name: _source_sum(name) for name in sorted(modules)}


@functools.cache  # the TE, main and encode artifacts share most of their traced modules (torch.nn, diffusers)
def _source_sum(name: str) -> str:
    import importlib
    import inspect

    try:
        return hashlib.sha256(inspect.getsource(importlib.import_module(name)).encode()).hexdigest()
    except (ImportError, OSError, TypeError):
        return ""


class Precompiled:
    """A bound method compiled whole for its first call's inputs and kept on disk between launches.

    ``torch.compile(fullgraph=True, dynamic=False).aot_compile`` packs dynamo's output (the rewritten
    bytecode and its guards) with inductor's code, so a later process loads the function without
    tracing the Python again: tracing the TE and the U-Net + decode was 26 s of a 70 s warm start on
    the H100 (docs/benchmarks.md). Parameters, buffers and tensor attributes stay inputs read from
    the object at every call, so weights and in-place constants (the adapter's cond rows) are live.

    One artifact per input signature (shapes, dtypes and ``variant()``: Python values the graph
    specialises on) in ``root()/precompiled/<key>-<name>-<signature>.bin``, with a ``.json`` beside
    it that holds the sha256 of every source module dynamo traced: when one changed (an upgraded
    diffusers, an edited streamedit) the artifact is stale and is compiled again. Anything that
    goes wrong (a torch without ``aot_compile``, a graph break, something that does not serialise, a
    guard that fails) falls back to plain ``torch.compile`` with a warning: the same code, traced.
    The weights' tensor guards are not saved; the ``.json`` holds their metadata instead and a load
    checks it (:func:`serialisable_guards`): a model whose weights differ in shape, layout, dtype,
    device or ``requires_grad`` compiles again, as a failed guard would.

    Loading stays on the calling thread: reading the artifacts ahead in a background thread while
    the engine was built gave nothing on the H100 (warm start 28.2 -> 27.7 s), as loading is Python
    holding the GIL (docs/benchmarks.md, ninth session).
    """

    def __init__(self, method, key: str, name: str, mode: str | None, backend: str = "inductor", variant=None,
                 inductor: dict | None = None, **options):
        self.owner = method.__self__  # artifacts take it as their first argument
        self.method, self.key, self.name, self.mode, self.backend = method, key, name, mode, backend
        self.inductor = dict(inductor or {})  # extra inductor options: part of the artifact's file name
        self.variant = variant or (lambda: ())
        self.options = options  # for the fallback; aot_compile always traces the whole function
        self._fns: dict = {}  # signature -> callable(*args)
        self._plain = None
        self.sources: list[str] = []  # how each signature was served: "loaded" | "compiled" | "fallback"
        self._served_as: dict = {}  # signature -> its entry of sources

    def __reduce__(self):
        # dynamo pickles the traced method's ``self`` with its guards; when this callable hangs off
        # that object (the Denoiser holds its compiled functions) it stands there as a name only
        return (str, (f"<precompiled {self.name}>",))

    def prepare(self, *args) -> str:
        """Get the function for these inputs (load or compile it) without running it: how it was served."""
        return self._served_as[self._get(args)[0]]

    def _get(self, args):
        sig = (tuple((tuple(a.shape), str(a.dtype), str(a.device)) for a in args), self.variant())
        fn = self._fns.get(sig)
        if fn is None:
            t0 = time.perf_counter()
            fn = self._fns[sig] = self._prepare(args, sig)
            self._served_as[sig] = self.sources[-1]
            how = f"{self.sources[-1]}:{self.name}"
            SECONDS[how] = SECONDS.get(how, 0.0) + time.perf_counter() - t0
        return sig, fn

    def __call__(self, *args):
        sig, fn = self._get(args)
        try:
            return fn(*args)
        except RuntimeError as exc:  # a Python value the artifact was specialised on has changed
            if "GuardManager check failed" not in str(exc):
                raise
            fn = self._fns[sig] = self._fallback(f"precompiled {self.name} no longer fits: {exc}")
            self._served_as[sig] = "fallback"
            return fn(*args)

    def _path(self, sig) -> Path:
        digest = hashlib.sha256(repr((sig, sorted(self.inductor.items()))).encode()).hexdigest()[:16]
        return root() / "precompiled" / f"{self.key}-{self.name}-{digest}.bin"

    def _aot_compiler(self, weights: dict):
        """torch.compile of the whole method that keeps only guards that can be written to disk; the
        weights' tensor guards go into ``weights`` as metadata instead (:func:`serialisable_guards`)."""
        # torch.compile takes a mode or options, not both: the mode's inductor options + ours + the filter
        options = {**mode_options(self.mode), **self.inductor} if self.backend == "inductor" else {}
        options["guard_filter_fn"] = functools.partial(serialisable_guards, weights=weights)
        with torch._dynamo.config.patch(enable_aot_compile=True):  # torch 2.11 attaches .aot_compile only then
            return torch.compile(self.method, backend=self.backend, options=options, fullgraph=True, dynamic=False)

    def _torch_compile(self):
        return compile_fn(self.method, self.mode, self.backend, self.inductor, **self.options)

    def _prepare(self, args, sig):
        path = self._path(sig)
        fn = self._load(path, args)
        if fn is not None:
            return self._served("loaded", fn)
        weights = {}  # filled while dynamo builds the guards
        try:
            aot = self._aot_compiler(weights).aot_compile((args, {}))
        except Exception as exc:  # noqa: BLE001  (graph break, backend without serialisation, old torch)
            return self._fallback(f"cannot precompile {self.name}: {exc}")
        self._save(aot, path, weights)
        return self._served("compiled", functools.partial(aot, self.owner))

    def _load(self, path: Path, args):
        meta = path.with_suffix(".json")
        if not (path.is_file() and meta.is_file()):
            return None
        try:
            saved = json.loads(meta.read_text())
            sums = saved["sources"]
            if _source_sums(sums) != sums:
                STATS["stale"] += 1
                return self._not_loaded(path, "is stale (its source changed)")
            if not weights_match(saved.get("weights", {}), self._locals(args)):
                return self._not_loaded(path, "does not fit these weights")
            with path.open("rb") as f:
                aot = torch.compiler.load_compiled_function(f, f_globals=self.method.__func__.__globals__)
            if not aot.guard_check(self.owner, *args):
                return self._not_loaded(path, "does not fit these inputs")
        except Exception as exc:  # noqa: BLE001  (a cache must never stop the engine)
            return self._not_loaded(path, f"is unusable: {type(exc).__name__}: {exc}", logging.WARNING)
        return functools.partial(aot, self.owner)

    def _not_loaded(self, path: Path, why: str, level: int = logging.INFO) -> None:
        log.log(level, "precompiled %s %s: compiling again", path.name, why)
        FALLBACKS[f"{self.name} (compiled again)"] = " ".join(f"saved artifact {why}".split())[:400]

    def _locals(self, args) -> dict:
        """The traced method's locals at a call: what dynamo's source names refer to."""
        import inspect

        return dict(inspect.signature(self.method.__func__).bind(self.owner, *args).arguments)

    def _save(self, aot, path: Path, weights: dict) -> None:
        try:
            modules = {s.module for s in aot.source_info().inlined_sources}
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".tmp{os.getpid()}")
            aot.save_compiled_function(str(tmp))
            tmp.replace(path)
            tmp.write_text(json.dumps({"name": self.name, "torch": torch.__version__, "sources": _source_sums(modules),
                                       "weights": weights}))
            tmp.replace(path.with_suffix(".json"))
        except Exception as exc:  # noqa: BLE001
            log.warning("could not save precompiled %s: %s", self.name, exc)

    def _fallback(self, why: str):
        log.warning("%s; using torch.compile", why)
        FALLBACKS[self.name] = " ".join(why.split())[:400]
        if self._plain is None:
            self._plain = self._torch_compile()
        return self._served("fallback", self._plain)

    def _served(self, how: str, fn):
        STATS[how] += 1
        self.sources.append(how)
        return fn
