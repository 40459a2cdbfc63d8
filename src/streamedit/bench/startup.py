"""``streamedit bench --startup``: seconds from process launch to the first output frame.

Two fresh Python processes run the same config one after the other on one new, empty
``STREAMEDIT_CACHE_DIR`` (accel/compile_cache.py; ``TORCHINDUCTOR_CACHE_DIR`` and ``TRITON_CACHE_DIR``
are removed from their environment so every cache lands there): **cold** compiles everything,
**warm** finds the first one's caches. Each child reports, in seconds since the parent launched
it (interpreter start included): imports done, models loaded, engine built, first output frame;
plus inductor's FX-graph / AOT-autograd cache hits and misses, so the warm launch is shown to be
served from the cache. The folder is deleted afterwards; its size is reported.

Child: ``python -m streamedit.bench.startup SPEC_JSON`` prints one JSON line.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from ..errors import StreameditError

LAUNCH_TIMEOUT_S = 1800


def measure_startup(model: str, revision, device: str, dtype: str, config, launches=("cold", "warm"),
                    profile_dir: str | None = None, overrides: dict[str, dict] | None = None) -> dict:
    """Launch the probe once per name in ``launches`` on one fresh cache folder; their reports.

    ``overrides``: launch name -> EngineConfig fields that launch changes (an A/B of warm starts on one
    cache, scripts/gpu_startup_ab.py; the fields must not change the compiled graphs).
    """
    spec = {"model": model, "revision": revision, "device": device, "dtype": dtype,
            "config": {f.name: getattr(config, f.name) for f in dataclasses.fields(config)}}
    root = tempfile.mkdtemp(prefix="streamedit-startup-")
    env = {k: v for k, v in os.environ.items() if k not in ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR")}
    env["STREAMEDIT_CACHE_DIR"] = root
    out: dict = {}
    try:
        for name in launches:
            changed = (overrides or {}).get(name, {})
            out[name] = _launch({**spec, "config": {**spec["config"], **changed}}, name, root, env)
            out[f"{name}_s"] = out[name]["first_frame_s"]
        if profile_dir:
            Path(profile_dir).mkdir(parents=True, exist_ok=True)
            stats = str(Path(profile_dir) / "warm-profiled.prof")
            _launch(spec, "warm-profiled", root, env, ["-m", "cProfile", "-o", stats])
            _write_top(stats, Path(profile_dir) / "warm-profiled.txt")
            out["profile"] = stats
        frames = [np.load(Path(root) / f"{name}.npy") for name in launches]
        # the launches' first frames, in 8-bit levels (0: bit-identical)
        out["first_frame_max_diff"] = max(int(np.abs(f.astype(np.int16) - frames[0]).max()) for f in frames)
        out["cache_mib"] = sum(p.stat().st_size for p in Path(root).rglob("*") if p.is_file() and p.suffix != ".npy") / 2**20
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return out


def _launch(spec: dict, name: str, root: str, env: dict, python_args=()) -> dict:
    """One fresh probe process; its report."""
    probe = {**spec, "t_launch": time.time(), "first_frame": str(Path(root) / f"{name}.npy")}
    proc = subprocess.run([sys.executable, *python_args, "-m", "streamedit.bench.startup",
                           json.dumps(probe, default=str)],
                          env=env, capture_output=True, text=True, timeout=LAUNCH_TIMEOUT_S)
    lines = proc.stdout.strip().splitlines()
    if proc.returncode or not lines:
        err = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise StreameditError(f"startup probe ({name} launch) failed: {err}")
    return json.loads(lines[-1])


def _write_top(stats_path: str, text_path: Path, count: int = 80) -> None:
    import io
    import pstats

    buf = io.StringIO()
    pstats.Stats(stats_path, stream=buf).sort_stats("cumulative").print_stats(count)
    text_path.write_text(buf.getvalue())


def _probe(spec: dict) -> dict:
    t0 = spec["t_launch"]
    import torch  # noqa: F401  (import time is part of the startup)

    from ..accel import compile_cache, graphs
    from ..cli.options import load
    from ..config import EngineConfig
    from ..engine.stream import StreamEngine
    from .run import bench_frames

    t_import = time.time() - t0
    models = load(spec["model"], spec["revision"], spec["device"], getattr(torch, spec["dtype"]))
    t_load = time.time() - t0
    config = EngineConfig(**spec["config"])
    frames = bench_frames(None, config.size, config.batch_size)
    config.frame_size = frames[0].shape[:2]  # the engine sets up and compiles here, not at the first frame
    engine = StreamEngine(models, config)
    t_engine = time.time() - t0
    outputs = engine.run(frames)
    first = next(outputs)
    t_first = time.time() - t0
    np.save(spec["first_frame"], first)
    for _ in outputs:  # the rest of the batch (and the engine's save of the compile artifacts)
        pass
    engine.close()
    return {"import_s": t_import, "load_s": t_load, "engine_s": t_engine, "first_frame_s": t_first,
            "total_s": time.time() - t0, "cache": compile_cache.cache_stats(),
            "compile_phases_s": _compile_phases(),
            "precompiled": dict(compile_cache.STATS), "precompiled_s": dict(compile_cache.SECONDS),
            "precompiled_fallbacks": dict(compile_cache.FALLBACKS),
            "graphs_s": dict(graphs.CAPTURE_SECONDS), "main_warmed_on_worker": engine.main_warmed_on_worker,
            "cache_dir": os.environ.get("TORCHINDUCTOR_CACHE_DIR"), "device": _device_name(models.device)}


def _compile_phases() -> dict:
    """Seconds this process spent per torch.compile phase (dynamo's own aggregate timers)."""
    from torch._dynamo.utils import compile_times

    names, values = compile_times(repr="csv", aggregate=True)
    return {n: float(v) for n, v in zip(names, values)}


def _device_name(device) -> str:
    from ..telemetry import device_name

    return device_name(device)


if __name__ == "__main__":
    import logging

    logging.basicConfig(level=logging.ERROR)
    print(json.dumps(_probe(json.loads(sys.argv[1]))), flush=True)
