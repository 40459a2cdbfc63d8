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

Nothing here changes results: a cache hit gives the same generated code as a fresh compile.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from pathlib import Path

import torch

log = logging.getLogger(__name__)

ENV = "STREAMEDIT_CACHE_DIR"
# EngineConfig fields that change what is compiled (shapes, graphs, modes)
GRAPH_FIELDS = ("batch_size", "steps", "size", "te_fast", "te_fp8", "te_batch_one", "compile", "compile_vae",
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


def artifact_key(models, config) -> str:
    """A file-name-safe hash of everything the compiled code depends on (not the weight values)."""
    device = models.device
    parts = {
        "torch": torch.__version__,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else device.type,
        "dtype": str(models.dtype),
        "unet": _public(models.unet.config), "vae": _public(models.vae.config),
        "te": models.text_encoder.config.to_json_string(use_diff=False),
        "lllite": config.lllite is not None,
        "config": {f.name: getattr(config, f.name) for f in dataclasses.fields(config) if f.name in GRAPH_FIELDS},
    }
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:24]


def _public(config) -> dict:
    """A diffusers config without its bookkeeping keys (``_use_default_values`` comes from a set)."""
    return {k: v for k, v in dict(config).items() if not k.startswith("_")}


def _mega_path(key: str) -> Path:
    return root() / "mega" / f"{key}.bin"


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
