"""Measurement side of ``streamedit bench``: the simulated camera, FLOPs, one row, the matrix.

Definitions (warm-up rule, latency, FLOPs, JSON fields): docs/benchmarks.md.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import queue
import threading
import time

import numpy as np

from ..config import build_config
from ..engine.probe import EngineProbe
from ..engine.stream import StreamEngine
from ..telemetry import COMPONENTS
from ..text.fast import te_fp8_agreement
from ..video.clips import _scene
from ..video.io import open_video
from . import agreement as agree

log = logging.getLogger(__name__)

BENCH_KEYS = ("source_fps", "hold")  # row overrides for the bench itself, not for the engine
PREWARM_BATCHES = 3  # untimed: compile, cudagraph-trees warm-up run + recording, allocator
assert PREWARM_BATCHES >= agree.PROBE_BATCHES  # the agreement probe records pre-warm batches only


# ------------------------------------------------------------------------------------------- source
class SimulatedSource:
    """``count`` frames (``frames`` looped) delivered as a camera at ``fps`` would deliver them.

    fps > 0: a producer thread sleeps until frame i's capture time t0 + i/fps, stamps it and queues
    it; a slow consumer lets the queue (and the latency) grow, as with a real camera. fps == 0: as
    fast as the engine pulls, stamped when pulled. ``captured[i]`` is frame i's perf_counter stamp.
    """

    def __init__(self, frames, count: int, fps: float):
        self.frames, self.count, self.fps = frames, count, fps
        self.captured: list[float] = []

    def __iter__(self):
        if self.fps <= 0:
            for i in range(self.count):
                self.captured.append(time.perf_counter())
                yield self.frames[i % len(self.frames)]
            return
        q, stop = queue.Queue(), threading.Event()

        def produce():
            t0 = time.perf_counter()
            for i in range(self.count):
                delay = t0 + i / self.fps - time.perf_counter()
                if (delay > 0 and stop.wait(delay)) or stop.is_set():
                    return
                q.put((self.frames[i % len(self.frames)], time.perf_counter()))

        threading.Thread(target=produce, daemon=True, name="streamedit-bench-source").start()
        try:
            for _ in range(self.count):
                frame, stamp = q.get()
                self.captured.append(stamp)
                yield frame
        finally:
            stop.set()  # the engine stopped early: end the producer too


def bench_frames(clip: str | None, size: int, count: int) -> list[np.ndarray]:
    """Up to ``count`` frames of ``clip`` (decoded once, looped by the source), or generated ones."""
    if clip:
        return list(itertools.islice(open_video(clip, size=size).frames(), count))

    return [_scene(i, size, size) for i in range(min(count, 48))]


def held(frames: list, hold: int) -> list:
    """Each frame repeated ``hold`` times: a low-motion source (a scene that changes every hold frames)."""
    return [f for f in frames for _ in range(max(1, hold))]


# ------------------------------------------------------------------------------------------ measure
def _attention_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    """softmax(q k^T) v: 2 FLOPs per multiply-add. Key/value may have fewer heads than the query
    (GQA: the U-Net's single kv head, Qwen3's 8), which the formula of torch < 2.13 rejects."""
    b, heads, s_q, d = query_shape
    return 2 * b * heads * s_q * key_shape[-2] * (d + value_shape[-1])


def count_flops(models, config, frames) -> dict:
    """FLOPs of one eager batch of ``config``: everything the engine runs ("total"), and within it the
    TE pass ("te") and the adapter's cond CNN ("cond"), which steady state runs only on some batches."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode


    aten = torch.ops.aten
    sdpa = [getattr(aten, n) for n in ("_scaled_dot_product_flash_attention", "_scaled_dot_product_efficient_attention",
                                       "_scaled_dot_product_cudnn_attention",
                                       "_scaled_dot_product_flash_attention_for_cpu") if hasattr(aten, n)]
    cfg = dataclasses.replace(config, compile=False, compile_vae=False, pipeline=False, profile=False,
                              low_latency=False, skip_similar=None, frame_size=frames[0].shape[:2])
    batch = [frames[i % len(frames)] for i in range(cfg.batch_size)]
    counters = {k: FlopCounterMode(display=False, custom_mapping={op: _attention_flops for op in sdpa})
                for k in ("te", "cond", "total")}
    with StreamEngine(models, cfg) as engine:  # closed (graphs, buffers, adapter patch) before the row's engine
        te_batch = 1 if cfg.te_batch_one else cfg.batch_size
        images = engine.te.prepare_images(batch[:te_batch])
        with counters["te"]:
            engine.te.encode(engine.prompt, images, te_batch)
        if getattr(engine, "adapter", None) is not None:
            with counters["cond"]:
                engine.adapter.set_cond_image(torch.from_numpy(np.stack(batch)).permute(0, 3, 1, 2).to(models.device))
        with counters["total"]:
            engine.process(batch)
    return {k: c.get_total_flops() for k, c in counters.items()}


def matmul_peak_tflops(device, n: int = 8192, iters: int = 20) -> float:
    """Best of 3 timings of ``iters`` bf16 n x n matmuls: the practical peak the TFLOP/s are held against."""
    import torch

    a, b = (torch.randn(n, n, device=device, dtype=torch.bfloat16) for _ in range(2))
    c = torch.empty_like(a)
    for _ in range(3):
        torch.mm(a, b, out=c)
    best = 0.0
    for _ in range(3):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            torch.mm(a, b, out=c)
        end.record()
        end.synchronize()
        best = max(best, 2 * n**3 * iters / (start.elapsed_time(end) / 1e3) / 1e12)
    del a, b, c
    torch.cuda.empty_cache()
    return best


def _pcts(values) -> dict:
    v = np.asarray(values, dtype=float)
    return {"p50": float(np.percentile(v, 50)), "p95": float(np.percentile(v, 95)), "max": float(v.max())}


def run_row(models, config, frames, count: int, fps: float, warmup: int,
            pending: agree.PendingRow | None = None) -> dict:
    """Stream ``count`` frames through one engine; timing fields of one result row. ``pending``: its probe
    records the first pre-warm batches, and it gets the engine's config, frames and adapter (bench/agreement.py)."""
    import torch


    cuda, bsz = models.device.type == "cuda", config.batch_size
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    source, out_t = SimulatedSource(frames, count, fps), []
    # closed on the way out, even on an error: its graphs, pools and adapter patch must not outlive the row
    # (the next row's engine captures graphs of its own on the same device and U-Net); set up (and compiled)
    # for the frames' working size at construction, as before any frame arrives
    config = dataclasses.replace(config, frame_size=frames[0].shape[:2])
    prewarm = [frames[i % len(frames)] for i in range(PREWARM_BATCHES * bsz)]
    with StreamEngine(models, config) as engine:
        if pending is not None:  # a few copies in the untimed pre-warm batches; the outputs are the same
            pending.config, pending.frames = config, prewarm
            engine.probe = pending.probe
        # Untimed batches before the camera starts (compile, CUDA-graph warm-up and capture, allocator), as
        # a live app would: else frames captured during a minutes-long compile flood the timed stream.
        t = time.perf_counter()
        engine.process(prewarm)
        prewarm_s = time.perf_counter() - t
        engine.batch_log.clear()
        for _ in engine.run(iter(source)):
            out_t.append(time.perf_counter())
    if pending is not None:
        pending.adapter = agree.host_adapter(engine.adapter)
    blog = engine.batch_log
    full = count // bsz
    counted = range(warmup, full)  # batch indices kept by the warm-up rule
    t0 = source.captured[0]
    done = [e.t_done for e in blog]
    frames_counted = len(counted) * bsz
    lat = [1e3 * (out_t[i] - source.captured[i]) for i in range(warmup * bsz, full * bsz)]
    walls = [1e3 * (done[k] - done[k - 1]) for k in counted]
    # CUDA-event ms, plus host-side ms (flow wait/CPU) of batches that had them; absent = 0 ms
    per_batch = [{**(blog[k].ms or {}), **blog[k].host_ms} for k in counted]
    names = set().union(*per_batch)
    order = [c for c in COMPONENTS if c in names] + sorted(names - set(COMPONENTS))
    comps = {c: [b.get(c, 0.0) for b in per_batch] for c in order}
    skipped_batches = sum(blog[k].te == "skipped" for k in counted)
    return {
        "frames_fed": count, "frames_out": len(out_t), "batch": bsz, "warmup_batches": warmup,
        "tail_frames_dropped": count % bsz, "frames_counted": frames_counted, "source_fps": fps,
        "fps": frames_counted / (done[full - 1] - done[warmup - 1]),
        "wall_s": out_t[-1] - t0, "prewarm_s": prewarm_s, "first_batch_s": done[0] - t0,
        "batch_wall_ms": _pcts(walls), "latency_ms": _pcts(lat),
        "component_ms_p50": {c: float(np.median(comps[c])) for c in order},
        "component_ms_mean": {c: float(np.mean(comps[c])) for c in order},
        # steady-state share of batches that ran the TE / rebuilt the adapter's cond embedding
        "te_fraction": float(np.mean([blog[k].te == "computed" for k in counted])),
        "cond_fraction": float(np.mean([(blog[k].cond or "reuse") != "reuse" for k in counted])),
        # similarity filter (skip_similar): frames that re-emitted the last output, batches that ran nothing
        "skipped_frames": int(sum(blog[k].skipped for k in counted)),
        "skipped_batches": int(skipped_batches), "computed_fraction": 1 - skipped_batches / len(counted),
        "peak_gpu_gib": torch.cuda.max_memory_allocated(models.device) / 2**30 if cuda else None,
        "series": {"t_done_s": [d - t0 for d in done], "batch_wall_ms": [1e3 * (d - p) for d, p in
                                                                         zip(done, [t0] + done[:-1])],
                   "latency_ms": lat},
    }


FLOPS_METHOD = ("FlopCounterMode over one eager batch of the row's config (TE + VAE encode + cond CNN + "
                "U-Net x steps + VAE decode), TE and cond CNN scaled by the share of batches that ran them, "
                "all scaled by the share of batches not skipped by the similarity filter")


def run_matrix(models, rows, base: dict, forced: dict, frames, count: int, fps: float, warmup: int,
               echo=None, on_row=None, agreement: bool = False) -> list[dict]:
    """Measure each (name, overrides) row on the same models; add ratio (fps / the `paper` row's fps) and, with
    ``agreement``, each row's agreement with an fp32 eager run (bench/agreement.py), after every row is timed."""
    import torch


    echo = echo or (lambda msg, err=False: log.info(msg))
    cuda = models.device.type == "cuda"
    peak = matmul_peak_tflops(models.device) if cuda else None
    flop_cache, results, pending = {}, [], {}
    for name, overrides in rows:
        bench_opts = {k: overrides[k] for k in BENCH_KEYS if k in overrides}
        overrides = {k: v for k, v in overrides.items() if k not in BENCH_KEYS}
        row_fps = bench_opts.get("source_fps", fps)
        row_frames = held(frames, bench_opts["hold"]) if bench_opts.get("hold") else frames
        config, notes = build_config(base, overrides, forced)
        if config.compile or config.vae_compiled:
            # a fresh compile per row: no dynamic-shape recompiles from earlier rows, and the previous
            # row's CUDA-graph pools are freed (peak memory is the row's own); the FX graph cache still
            # spares inductor's code generation for graphs an earlier row compiled
            torch._dynamo.reset()
        key = tuple((f.name, repr(getattr(config, f.name))) for f in dataclasses.fields(config)
                    if f.name not in ("compile", "compile_vae", "compile_mode", "compile_backend", "channels_last",
                                      "pipeline", "profile", "prefetch", "low_latency", "skip_similar"))
        try:
            if key not in flop_cache:
                flop_cache[key] = count_flops(models, config, row_frames)
            fl = flop_cache[key]
            row_probe = agree.PendingRow(None, None, EngineProbe(agree.PROBE_BATCHES)) if agreement else None
            res = {"row": name, **run_row(models, config, row_frames, count, row_fps, warmup, row_probe)}
            if config.te_fp8:  # how far FP8 moves the TE output, on this row's frames

                batch = torch.from_numpy(np.stack([row_frames[i % len(row_frames)] for i in range(config.batch_size)]))
                res["te_fp8_agreement"] = te_fp8_agreement(models, batch, config.prompt, config.te_size)
        except Exception as exc:  # one broken row must not cost the rest of a long GPU run
            if len(rows) == 1:
                raise
            echo(f"  {name}: FAILED: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}", err=True)
            continue
        per_frame = (fl["total"] - fl["te"] * (1 - res["te_fraction"]) - fl["cond"] * (1 - res["cond_fraction"])) \
            / config.batch_size * res["computed_fraction"]
        tflops = per_frame * res["fps"] / 1e12
        res.update(flops_per_frame=per_frame, te_flops_per_frame=fl["te"] / config.batch_size,
                   cond_flops_per_refresh=fl["cond"], flops_method=FLOPS_METHOD, tflops=tflops,
                   matmul_peak_tflops=peak, pct_of_peak=100 * tflops / peak if peak else None,
                   overrides={**overrides, **bench_opts}, notes=notes, config=vars(config))
        if bench_opts.get("hold"):
            notes.append(f"low-motion source: each frame held {bench_opts['hold']} times")
        res["keeps_up"] = bool(res["fps"] >= 0.95 * row_fps) if row_fps else None
        if res["keeps_up"]:
            notes.append(f"keeps up with the {row_fps:g} fps source, so its fps is capped: use --source-fps 0 "
                         "for ratios")
        elif res["keeps_up"] is False:
            notes.append(f"cannot keep up with the {row_fps:g} fps source ({res['fps']:.1f} fps): frames queue "
                         "up and latency grows with the run's length")
        results.append(res)
        if row_probe is not None:
            pending[name] = row_probe
        if on_row is not None:
            on_row(res)
        echo(f"  {name}: {res['fps']:.1f} fps, latency p50 {res['latency_ms']['p50']:.0f} ms", err=True)
    if pending:
        echo(f"agreement: {len(pending)} row(s), {agree.PROBE_BATCHES} batches each, vs fp32 eager", err=True)
        found = agree.measure_all(models, pending, echo)
        for r in results:
            if r["row"] in found:
                r["agreement"] = found[r["row"]]
    ref = next((r for r in results if r["row"] == "paper"), None)
    for r in results:
        comparable = ref is not None and r["source_fps"] == ref["source_fps"]
        r["ratio"] = r["fps"] / ref["fps"] if comparable else None
        if ref is not None and not comparable:
            r["notes"].append(f"no ratio: fed at {r['source_fps']:g} fps, the paper row at {ref['source_fps']:g}")
    return results
