"""``streamedit bench``: throughput and latency of the real engine, for any model source.

Frames come from :class:`SimulatedSource` (a camera at ``--source-fps``: a producer thread sleeps
until each frame's capture time and stamps it) and go through ``StreamEngine.run`` with
``profile=True``, exactly as ``stylize`` runs them. ``--matrix`` measures :data:`MATRIX` rows (named
EngineConfig overrides) on one loaded model, so every ``ratio`` (fps / reference fps) comes from one
process. Warm-up rule, latency, FLOP counting and the JSONL fields: docs/benchmarks.md.
"""

from __future__ import annotations

import ast
import dataclasses
import datetime
import itertools
import json
import logging
import queue
import shlex
import sys
import threading
import time
from pathlib import Path

import click
import numpy as np

from .cli import lllite_options, load, model_options, resolve_device, temporal_config
from .bench_report import COMPONENTS, check_matplotlib, command_line, device_name, format_table, save_plot
from .errors import StreameditError

log = logging.getLogger(__name__)

# Named EngineConfig overrides on top of the CLI's base config (--batch/--steps/--size and the adapter
# flags; defaults = the paper's B=8, 1 step, 512^2, hooks down, cond-refresh 8). Keys the engine does
# not have are dropped and the row's notes say so. --lllite PATH replaces "random" in every row.
PAPER = dict(pipeline=True, compile=True, compile_mode="reduce-overhead", lllite="random")
MATRIX = [
    ("reference", PAPER),  # the paper's recipe; every ratio is against this row
    ("best", dict(PAPER, te_fast=True)),  # + static, sync-free, compiled/graphed TE (exact)
    ("no-side-stream", dict(PAPER, pipeline=False)),
    ("B=1", dict(PAPER, batch_size=1)),
    ("no-compile", dict(PAPER, compile=False)),
    ("no-lllite", dict(PAPER, lllite=None)),
]


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
        from .io import open_video

        return list(itertools.islice(open_video(clip, size=size).frames(), count))
    from .clips import _scene  # the synthetic scene of make_test_clip: smooth motion, one moving object

    return [_scene(i, size, size) for i in range(min(count, 48))]


# ------------------------------------------------------------------------------------------- config
def engine_fields() -> set[str]:
    from .engine import EngineConfig

    return {f.name for f in dataclasses.fields(EngineConfig)}


def parse_sets(sets) -> dict:
    """``--set KEY=VALUE`` pairs -> EngineConfig overrides (values as Python literals, else strings)."""
    out, fields = {}, engine_fields()
    for item in sets:
        key, sep, raw = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not key:
            raise StreameditError(f"--set expects KEY=VALUE, got {item!r}")
        if key not in fields or key == "prompt":
            raise StreameditError(f"--set {key}: EngineConfig has no such field (fields: {', '.join(sorted(fields))})")
        try:
            out[key] = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            out[key] = raw
    return out


def build_config(base: dict, overrides: dict, forced: dict):
    """EngineConfig of base < row overrides < --set; returns (config, notes)."""
    from .engine import EngineConfig

    fields, merged = engine_fields(), {**base, **overrides, **forced}
    notes = [f"engine has no {k!r}: runs without it" for k in merged if k not in fields and merged[k] is not None]
    return EngineConfig(**{k: v for k, v in merged.items() if k in fields}), notes


def finite(obj):
    """NaN/inf -> None, recursively: strict JSON (jq, browsers) has no NaN."""
    if isinstance(obj, float):
        return obj if np.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite(v) for k, v in obj.items()}
    return [finite(v) for v in obj] if isinstance(obj, (list, tuple)) else obj


def dumps(obj) -> str:
    """One strict-JSON line; objects such as an adapter in a config are written as their class name."""
    return json.dumps(finite(obj), default=lambda o: type(o).__name__)


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

    from .engine import StreamEngine

    aten = torch.ops.aten
    sdpa = [getattr(aten, n) for n in ("_scaled_dot_product_flash_attention", "_scaled_dot_product_efficient_attention",
                                       "_scaled_dot_product_cudnn_attention",
                                       "_scaled_dot_product_flash_attention_for_cpu") if hasattr(aten, n)]
    cfg = dataclasses.replace(config, compile=False, pipeline=False, profile=False)
    batch = [frames[i % len(frames)] for i in range(cfg.batch_size)]
    engine = StreamEngine(models, cfg)
    counters = {k: FlopCounterMode(display=False, custom_mapping={op: _attention_flops for op in sdpa})
                for k in ("te", "cond", "total")}
    try:
        te_batch = 1 if cfg.te_batch_one else cfg.batch_size
        images = engine.te.prepare_images(batch[:te_batch])
        with counters["te"]:
            engine.te.encode(engine.prompt, images, te_batch)
        if getattr(engine, "adapter", None) is not None:
            with counters["cond"]:
                engine.adapter.set_cond_image(torch.from_numpy(np.stack(batch)).permute(0, 3, 1, 2).to(models.device))
        with counters["total"]:
            engine.process(batch)
    finally:
        engine.close()
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


def run_row(models, config, frames, count: int, fps: float, warmup: int) -> dict:
    """Stream ``count`` frames through one engine; timing fields of one result row."""
    import torch

    from .engine import StreamEngine

    cuda, bsz = models.device.type == "cuda", config.batch_size
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    engine = StreamEngine(models, config)
    source, out_t = SimulatedSource(frames, count, fps), []
    try:
        # One untimed batch before the camera starts (compile, CUDA-graph warm-up, allocator), as a live
        # app would: else frames captured during a minutes-long compile flood the timed stream.
        t = time.perf_counter()
        engine.process([frames[i % len(frames)] for i in range(bsz)])
        prewarm_s = time.perf_counter() - t
        engine.batch_log.clear()
        for _ in engine.run(iter(source)):
            out_t.append(time.perf_counter())
    finally:
        engine.close()
    blog = engine.batch_log
    full = count // bsz
    counted = range(warmup, full)  # batch indices kept by the warm-up rule
    t0 = source.captured[0]
    done = [e["t_done"] for e in blog]
    frames_counted = len(counted) * bsz
    lat = [1e3 * (out_t[i] - source.captured[i]) for i in range(warmup * bsz, full * bsz)]
    walls = [1e3 * (done[k] - done[k - 1]) for k in counted]
    # CUDA-event ms, plus host-side ms (flow wait/CPU) of batches that had them; absent = 0 ms
    per_batch = [{**(blog[k].get("ms") or {}),
                  **{n.removesuffix("_ms"): v for n, v in blog[k].get("host_ms", {}).items()}} for k in counted]
    names = set().union(*per_batch)
    order = [c for c in COMPONENTS if c in names] + sorted(names - set(COMPONENTS))
    comps = {c: [b.get(c, 0.0) for b in per_batch] for c in order}
    return {
        "frames_fed": count, "frames_out": len(out_t), "batch": bsz, "warmup_batches": warmup,
        "tail_frames_dropped": count % bsz, "frames_counted": frames_counted,
        "fps": frames_counted / (done[full - 1] - done[warmup - 1]),
        "wall_s": out_t[-1] - t0, "prewarm_s": prewarm_s, "first_batch_s": done[0] - t0,
        "batch_wall_ms": _pcts(walls), "latency_ms": _pcts(lat),
        "component_ms_p50": {c: float(np.median(comps[c])) for c in order},
        "component_ms_mean": {c: float(np.mean(comps[c])) for c in order},
        # steady-state share of batches that ran the TE / rebuilt the adapter's cond embedding
        "te_fraction": float(np.mean([blog[k]["te"] == "computed" for k in counted])),
        "cond_fraction": float(np.mean([blog[k].get("cond", "reuse") != "reuse" for k in counted])),
        "peak_gpu_gib": torch.cuda.max_memory_allocated(models.device) / 2**30 if cuda else None,
        "series": {"t_done_s": [d - t0 for d in done], "batch_wall_ms": [1e3 * (d - p) for d, p in
                                                                         zip(done, [t0] + done[:-1])],
                   "latency_ms": lat},
    }


FLOPS_METHOD = ("FlopCounterMode over one eager batch of the row's config (TE + VAE encode + cond CNN + "
                "U-Net x steps + VAE decode), TE and cond CNN scaled by the share of batches that ran them")


def run_matrix(models, rows, base: dict, forced: dict, frames, count: int, fps: float, warmup: int,
               echo=None, on_row=None) -> list[dict]:
    """Measure each (name, overrides) row on the same models; add ratio (fps / reference fps)."""
    import torch

    echo = echo or (lambda msg, err=False: log.info(msg))
    cuda = models.device.type == "cuda"
    peak = matmul_peak_tflops(models.device) if cuda else None
    flop_cache, results = {}, []
    for name, overrides in rows:
        config, notes = build_config(base, overrides, forced)
        if config.compile:
            torch._dynamo.reset()  # a fresh compile per row: no dynamic-shape recompiles from earlier rows
        key = tuple((f.name, repr(getattr(config, f.name))) for f in dataclasses.fields(config)
                    if f.name not in ("compile", "compile_mode", "pipeline", "profile", "prefetch"))
        if key not in flop_cache:
            flop_cache[key] = count_flops(models, config, frames)
        fl = flop_cache[key]
        try:
            res = {"row": name, **run_row(models, config, frames, count, fps, warmup)}
        except Exception as exc:  # one broken row must not cost the rest of a long GPU run
            if len(rows) == 1:
                raise
            echo(f"  {name}: FAILED: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}", err=True)
            continue
        per_frame = (fl["total"] - fl["te"] * (1 - res["te_fraction"]) - fl["cond"] * (1 - res["cond_fraction"])) \
            / config.batch_size
        tflops = per_frame * res["fps"] / 1e12
        res.update(flops_per_frame=per_frame, te_flops_per_frame=fl["te"] / config.batch_size,
                   cond_flops_per_refresh=fl["cond"], flops_method=FLOPS_METHOD, tflops=tflops,
                   matmul_peak_tflops=peak, pct_of_peak=100 * tflops / peak if peak else None,
                   overrides=overrides, notes=notes, config=vars(config))
        res["keeps_up"] = bool(res["fps"] >= 0.95 * fps) if fps else None
        if res["keeps_up"]:
            notes.append(f"keeps up with the {fps:g} fps source, so its fps is capped: use --source-fps 0 for ratios")
        results.append(res)
        if on_row is not None:
            on_row(res)
        echo(f"  {name}: {res['fps']:.1f} fps, latency p50 {res['latency_ms']['p50']:.0f} ms", err=True)
    ref = next((r for r in results if r["row"] == "reference"), None)
    for r in results:
        r["ratio"] = r["fps"] / ref["fps"] if ref else None
    return results


def select_rows(matrix: bool, rows: str | None, compile_: bool, lllite: str | None) -> list[tuple[str, dict]]:
    if not matrix:
        return [("run", {"compile": compile_})]
    if compile_:
        raise StreameditError("--compile is for a single run; matrix rows set compile themselves "
                              "(--set compile=False turns it off everywhere)")
    known = dict(MATRIX)
    names = [n.strip() for n in rows.split(",")] if rows else list(known)
    bad = [n for n in names if n not in known]
    if bad:
        raise StreameditError(f"unknown --rows {', '.join(bad)}: choose from {', '.join(known)}")
    selected = [(n, dict(known[n])) for n in names]
    for _, o in selected:
        if lllite and o.get("lllite"):
            o["lllite"] = lllite
    return selected


# ----------------------------------------------------------------------------------------------- CLI
@click.command("bench")
@model_options
@click.option("--prompt", default="oil painting", show_default=True)
@click.option("--batch", default=8, show_default=True, type=click.IntRange(1), help="Frames per batch.")
@click.option("--steps", default=1, show_default=True, help="Denoising steps (1-4).")
@click.option("--size", default=512, show_default=True, help="Working resolution (square).")
@click.option("--frames", "count", default=480, show_default=True, type=click.IntRange(1), help="Frames fed.")
@click.option("--source-fps", default=30.0, show_default=True, type=click.FloatRange(0),
              help="Simulated camera rate; 0 = as fast as the engine takes frames.")
@click.option("--clip", type=click.Path(dir_okay=False), default=None, help="Video to loop (default: generated).")
@lllite_options
@click.option("--compile", "compile_", is_flag=True, help="torch.compile the U-Net (single run).")
@click.option("--warmup", default=1, show_default=True, type=click.IntRange(1), help="Batches excluded.")
@click.option("--matrix", is_flag=True, help="Run the comparison rows in one process: " +
              ", ".join(n for n, _ in MATRIX) + ".")
@click.option("--rows", default=None, help="Comma-separated matrix rows to run (implies --matrix).")
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE",
              help="EngineConfig field for every row, after the row's own overrides (e.g. compile=False).")
@click.option("--seed", default=0, show_default=True)
@click.option("--json", "json_path", default=None, help="Write one JSON line per row here.")
@click.option("--plot", "plot_path", default=None, help="Write a PNG (batch wall over time, latency CDF).")
def bench_command(model, revision, device, dtype, prompt, batch, steps, size, count, source_fps, clip, compile_,
                  warmup, matrix, rows, sets, seed, json_path, plot_path, **temporal):
    """Throughput and latency of the engine on a simulated real-time source."""
    import torch

    from .engine import clean_prompt

    ctx = click.get_current_context()
    forced = parse_sets(sets)
    adapter = temporal_config(**temporal)
    selected = select_rows(matrix or bool(rows), rows, compile_, adapter["lllite"])
    if count < (warmup + 1) * max({"batch_size": batch, **o, **forced}["batch_size"] for _, o in selected):
        raise StreameditError(f"--frames {count} leaves no batch after the {warmup} warm-up batch(es)")
    for path in (json_path, plot_path):
        if path and not Path(path).parent.is_dir():
            raise StreameditError(f"output folder does not exist: {Path(path).parent}")
    if plot_path:
        check_matplotlib()  # fail now, not after a long run
    base = dict(prompt=clean_prompt(prompt), batch_size=batch, steps=steps, size=size, seed=seed, profile=True,
                **adapter)
    device, torch_dtype = resolve_device(device, dtype)
    if device == "cpu" and any({**o, **forced}.get("compile") for _, o in selected):
        log.warning("torch.compile on CPU takes minutes; --set compile=False skips it")
    frames = bench_frames(clip, size, count)
    models = load(model, revision, device, torch_dtype)
    click.echo(f"bench: {model} on {device_name(models.device)}, {torch_dtype}, {size}x{size}, {steps} step(s), "
               f"{count} frames, source {source_fps:g} fps" + (" (as fast as possible)" if not source_fps else ""),
               err=True)
    meta = {"device": device_name(models.device), "torch": torch.__version__, "model": model, "dtype": str(torch_dtype),
            "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "command": command_line(ctx), "argv": shlex.join(sys.argv), "source_fps": source_fps}

    def save_row(res):  # rows land on disk as they finish; rewritten with ratios at the end
        if json_path:
            with open(json_path, "a") as fh:
                fh.write(dumps({**meta, **res}) + "\n")

    if json_path:
        open(json_path, "w").close()
    results = run_matrix(models, selected, base, forced, frames, count, source_fps, warmup, echo=click.echo,
                         on_row=save_row)
    if not results:
        raise StreameditError("every benchmark row failed (see the messages above)")
    r0 = results[0]
    click.echo(f"warm-up: one untimed batch before the source starts, then the first {warmup} batch(es) "
               f"excluded and the partial tail batch dropped "
               f"({r0['row']}: {r0['frames_counted']} of {count} frames counted). "
               f"fps = counted frames / their span of batch completions; latency = capture -> out.")
    click.echo(f"FLOPs: {FLOPS_METHOD}. " + ("% peak: vs a bf16 matmul measured now "
                                             f"({r0['matmul_peak_tflops']:.0f} TFLOP/s)."
                                             if r0["matmul_peak_tflops"] else "CUDA-only fields: —"))
    click.echo(format_table(results))
    if any(r["ratio"] is None for r in results) and len(results) > 1:
        click.echo("ratio: — (no 'reference' row in this run)")
    if json_path:
        with open(json_path, "w") as fh:
            for r in results:
                fh.write(dumps({**meta, **r}) + "\n")
    if plot_path:
        save_plot(results, plot_path)
