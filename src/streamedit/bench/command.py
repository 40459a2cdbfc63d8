"""``streamedit bench``: throughput and latency of the real engine, for any model source.

Frames come from :class:`SimulatedSource` (a camera at ``--source-fps``: a producer thread sleeps
until each frame's capture time and stamps it) and go through ``StreamEngine.run`` with
``profile=True``, exactly as ``stylize`` runs them. ``--matrix`` measures :data:`MATRIX` rows (named
EngineConfig overrides) on one loaded model, so every ``ratio`` (fps / fps of the ``paper`` row) comes from one
process. ``--startup`` times fresh processes to their first output frame (bench/startup.py).
``--agreement`` (default on for CUDA matrix runs) compares each row's TE output and final latents with an fp32
eager run of its config, against the bf16 eager noise floor (bench/agreement.py).
Warm-up rule, latency, FLOP counting and the JSONL fields: docs/benchmarks.md. The measuring
code is in bench/run.py.
"""

from __future__ import annotations

import datetime
import logging
import shlex
import sys
from pathlib import Path

import click

from ..cli.options import (check_size, command_line, lllite_options, load, model_options, resolve_device,
                           te_size_option, temporal_config)
from ..config import EXACT, PRESETS
from ..config import build_config as _build_config
from ..config import clean_prompt, parse_sets
from ..errors import StreameditError
from ..models.loading import working_size
from ..telemetry import device_name, dumps
from .report import check_matplotlib, format_startup, format_table, save_plot
from .agreement import PROBE_BATCHES
from .run import BENCH_KEYS, FLOPS_METHOD, PREWARM_BATCHES, bench_frames, held, run_matrix
from .startup import measure_startup

log = logging.getLogger(__name__)

# Named EngineConfig overrides on top of the CLI's base config (--batch/--steps/--size and the adapter
# flags; defaults = the paper's B=8, 1 step, 512^2, hooks down, cond-refresh 8). Keys the engine does
# not have are dropped and the row's notes say so. --lllite PATH replaces "random" in every row.
# Rows may also set the bench's own BENCH_KEYS: source_fps (the row's camera rate) and hold (each
# source frame repeated N times: a low-motion source for the similarity filter).
# The paper's recipe as its code runs it (config.PRESETS["paper"]): the TE eager at its 256x256 BILINEAR view
# padded to 256 tokens, the U-Net compiled (reduce-overhead), the VAE eager, TE + VAE encode on the side
# stream, the adapter on the down blocks refreshed every 8 batches, Farnebäck threaded at full resolution.
PAPER = dict(pipeline=True, lllite="random", **PRESETS["paper"])
PAPER_512 = dict(PAPER, te_size=512)  # the same at upstream's 512x512 TE view (the 0.1 `reference` row)
BEST = dict(PAPER_512, **EXACT)  # the exact preset: every exact speed-up, at upstream's TE view
MATRIX = [
    ("paper", PAPER),  # every ratio is against this row
    ("reference-512", PAPER_512),
    # exact speed-ups: static, sync-free, compiled/graphed TE; U-Net + VAE decode one graph, graphed VAE encode;
    # + the cond refresh spread over batches (one slot per batch at B=8, N=8), Farnebäck at 256 px and the
    # main stream at high CUDA priority
    ("best", BEST),
    ("best-te256", dict(BEST, te_size=256)),  # the same at the paper's TE view
    ("best-eager-vae", dict(BEST, compile_vae=False)),  # what compiling the VAE buys
    ("best-no-prio", dict(BEST, main_priority=False)),  # what the main stream's priority buys
    ("no-side-stream", dict(PAPER_512, pipeline=False)),
    ("B=1", dict(PAPER_512, batch_size=1)),
    ("no-compile", dict(PAPER_512, compile=False)),
    ("no-lllite", dict(PAPER_512, lllite=None)),
    # approximations
    ("approx", dict(BEST, te_refresh_every=8, te_batch_one=True)),  # TE once per 8 batches, on one frame
    ("fp8", dict(BEST, te_fp8=True)),  # FP8 TE Linears (Hopper/Ada); records te_fp8_agreement
    ("similar", dict(BEST, skip_similar=1.0, hold=16)),  # similarity filter on a low-motion source
    # latency: one frame per batch, latency-first schedule, a 30 fps camera
    ("low-latency", dict(PAPER_512, **PRESETS["low-latency"], source_fps=30.0)),
]
ALIASES = {"reference": "reference-512"}  # 0.1 row names


def select_rows(matrix: bool, rows: str | None, compile_: bool, lllite: str | None) -> list[tuple[str, dict]]:
    if not matrix:
        return [("run", {"compile": compile_})]
    if compile_:
        raise StreameditError("--compile is for a single run; matrix rows set compile themselves "
                              "(--set compile=False turns it off everywhere)")
    known = dict(MATRIX)
    names = [ALIASES.get(n.strip(), n.strip()) for n in rows.split(",")] if rows else list(known)
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
@click.option("--size", type=int, default=None,
              help="Working resolution, the long side (synthetic frames are square; a --clip keeps its aspect). "
                   "Default: the model's own (256 for demo), else 512, as stylize.")
@click.option("--frames", "count", default=480, show_default=True, type=click.IntRange(1), help="Frames fed.")
@click.option("--source-fps", default=30.0, show_default=True, type=click.FloatRange(0),
              help="Simulated camera rate; 0 = as fast as the engine takes frames (rows may set their own).")
@click.option("--clip", type=click.Path(dir_okay=False), default=None, help="Video to loop (default: generated).")
@click.option("--hold", default=1, show_default=True, type=click.IntRange(1),
              help="Repeat each source frame N times (a low-motion source, for --skip-similar).")
@lllite_options
@te_size_option
@click.option("--compile", "compile_", is_flag=True, help="torch.compile U-Net and VAE (single run).")
@click.option("--skip-similar", type=click.FloatRange(0), default=None,
              help="Similarity filter threshold (gray levels) for every row; see stylize --help.")
@click.option("--warmup", default=1, show_default=True, type=click.IntRange(1), help="Batches excluded.")
@click.option("--matrix", is_flag=True, help="Run the comparison rows in one process: " +
              ", ".join(n for n, _ in MATRIX) + ".")
@click.option("--rows", default=None, help="Comma-separated matrix rows to run (implies --matrix).")
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE",
              help="EngineConfig field for every row, after the row's own overrides (e.g. compile=False).")
@click.option("--startup", is_flag=True,
              help="Also time two fresh processes to their first output frame (first row's config): "
                   "cold (empty compile cache) and warm.")
@click.option("--startup-only", is_flag=True, help="Only the --startup measurement.")
@click.option("--startup-profile", "startup_profile", default=None, metavar="DIR",
              help="With --startup: one more warm launch under cProfile, stats written to DIR.")
@click.option("--agreement/--no-agreement", default=None,
              help="After the timed rows, compare each row's TE output and final latents on its first "
                   f"{PROBE_BATCHES} batches with an fp32 eager run of its config, against the bf16 eager "
                   "noise floor (the 'exact' column). Default: on for CUDA matrix runs, else off.")
@click.option("--seed", default=0, show_default=True)
@click.option("--json", "json_path", default=None, help="Write one JSON line per row here.")
@click.option("--plot", "plot_path", default=None, help="Write a PNG (batch wall over time, latency CDF).")
def bench_command(model, revision, device, dtype, prompt, batch, steps, size, count, source_fps, clip, hold, te_size,
                  compile_, skip_similar, warmup, matrix, rows, sets, startup, startup_only, startup_profile, agreement,
                  seed, json_path, plot_path, **temporal):
    """Throughput and latency of the engine on a simulated real-time source."""
    import torch



    ctx = click.get_current_context()
    check_size(size)
    size = working_size(size, model)
    forced = parse_sets(sets)
    adapter = temporal_config(**temporal)
    selected = select_rows(matrix or bool(rows), rows, compile_, adapter["lllite"])
    if count < (warmup + 1) * max({"batch_size": batch, **o, **forced}["batch_size"] for _, o in selected):
        raise StreameditError(f"--frames {count} leaves no batch after the {warmup} warm-up batch(es)")
    if startup_profile and not (startup or startup_only):
        raise StreameditError("--startup-profile needs --startup or --startup-only")
    for path in (json_path, plot_path):
        if path and not Path(path).parent.is_dir():
            raise StreameditError(f"output folder does not exist: {Path(path).parent}")
    if plot_path and not startup_only:
        check_matplotlib()  # fail now, not after a long run
    base = dict(prompt=clean_prompt(prompt), batch_size=batch, steps=steps, size=size, seed=seed, profile=True,
                skip_similar=skip_similar, te_size=te_size, **adapter)
    device, torch_dtype = resolve_device(device, dtype)
    if device == "cpu" and any({**o, **forced}.get("compile") for _, o in selected) and not startup_only:
        log.warning("torch.compile on CPU takes minutes; --set compile=False skips it")
    meta = {"torch": torch.__version__, "model": model, "dtype": str(torch_dtype),
            "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "command": command_line(ctx), "argv": shlex.join(sys.argv), "source_fps": source_fps}
    lines = []

    def save_row(res):  # rows land on disk as they finish; rewritten with ratios at the end
        lines.append(res)
        if json_path:
            with open(json_path, "a") as fh:
                fh.write(dumps({**meta, **res}) + "\n")

    if json_path:
        open(json_path, "w").close()
    if startup or startup_only:  # before this process loads anything on the GPU

        name, overrides = selected[0]
        config, _ = build_config(base, overrides, forced)
        click.echo(f"startup: two fresh processes, {name} config (cold, then warm compile cache)", err=True)
        res = measure_startup(model, revision, device, str(torch_dtype).removeprefix("torch."), config,
                              profile_dir=startup_profile)
        save_row({"row": "startup", "kind": "startup", "config_row": name, **res})
        click.echo(format_startup(lines[-1]))
        if startup_only:
            return
    frames = bench_frames(clip, size, count)
    if hold > 1:
        frames = held(frames, hold)
    models = load(model, revision, device, torch_dtype)
    meta["device"] = device_name(models.device)
    click.echo(f"bench: {model} on {meta['device']}, {torch_dtype}, {frames[0].shape[1]}x{frames[0].shape[0]}, {steps} step(s), "
               f"{count} frames, source {source_fps:g} fps" + (" (as fast as possible)" if not source_fps else ""),
               err=True)
    if agreement is None:
        agreement = models.device.type == "cuda" and (matrix or bool(rows))
    results = run_matrix(models, selected, base, forced, frames, count, source_fps, warmup, echo=click.echo,
                         on_row=save_row, agreement=agreement)
    if not results:
        raise StreameditError("every benchmark row failed (see the messages above)")
    r0 = results[0]
    click.echo(f"warm-up: {PREWARM_BATCHES} untimed batches before the source starts, then the first {warmup} "
               f"batch(es) excluded and the partial tail batch dropped "
               f"({r0['row']}: {r0['frames_counted']} of {count} frames counted). "
               f"fps = counted frames / their span of batch completions; latency = capture -> out.")
    click.echo(f"FLOPs: {FLOPS_METHOD}. " + ("% peak: vs a bf16 matmul measured now "
                                             f"({r0['matmul_peak_tflops']:.0f} TFLOP/s)."
                                             if r0["matmul_peak_tflops"] else "CUDA-only fields: —"))
    click.echo(format_table(results))
    if all(r["ratio"] is None for r in results) and len(results) > 1:
        click.echo("ratio: — (no 'paper' row in this run)")
    if json_path:
        with open(json_path, "w") as fh:
            for r in [line for line in lines if line.get("kind") == "startup"] + results:
                fh.write(dumps({**meta, **r}) + "\n")
    if plot_path:
        save_plot(results, plot_path)


def build_config(base: dict, overrides: dict, forced: dict):
    """:func:`streamedit.config.build_config` of a bench row: the bench's own keys (BENCH_KEYS) are not config."""
    return _build_config(base, {k: v for k, v in overrides.items() if k not in BENCH_KEYS}, forced)
