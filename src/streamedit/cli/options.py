"""Options and helpers shared by every command that loads a model (stylize, info, bench, eval, serve, live, train): model/device/dtype, the temporal adapter, speed flags."""

from __future__ import annotations

import logging
import shlex

import click

from ..errors import StreameditError


def command_line(ctx) -> str:
    """The invocation as a reproducible command (non-default options only)."""
    parts = ["streamedit", ctx.info_name]
    for p in ctx.command.params:
        v = ctx.params.get(p.name)
        if v == p.default or v in (None, False, ()):
            continue
        opt = max(p.opts, key=len)
        parts += [opt] if getattr(p, "is_flag", False) else [x for item in (v if p.multiple else [v])
                                                             for x in (opt, str(item))]
    return shlex.join(parts)


DTYPES = ("float32", "bfloat16", "float16")


def lllite_options(fn):
    """The temporal-adapter flags shared by stylize, bench and eval."""
    opts = [
        click.option("--lllite", default=None,
                     help="Temporal LLLite adapter (.safetensors), 'demo' (the demo model's), or 'random'."),
        click.option("--hooks", default=None,
                     help="down | mid | up | all | name,name,... (default: every hook in the adapter file; "
                          "down for 'random')."),
        click.option("--cond-refresh", default=8, show_default=True, help="Rebuild the cond embedding every N batches."),
        click.option("--lllite-multiplier", default=1.0, show_default=True, help="Adapter strength."),
        click.option("--cut-refresh/--no-cut-refresh", default=True, show_default=True,
                     help="Refresh cond (and TE) on the batch holding a scene cut."),
        click.option("--motion-refresh", type=float, default=None,
                     help="Refresh early when mean flow (px) since the last refresh exceeds this."),
        click.option("--cond-stagger/--no-cond-stagger", default=False,
                     help="Spread the cond refresh: B/N batch slots every batch instead of all B every N batches."),
        click.option("--flow-size", type=int, default=None,
                     help="Compute the optical flow at this resolution (default: the working size)."),
    ]
    for opt in reversed(opts):
        fn = opt(fn)
    return fn


def temporal_config(lllite, hooks, cond_refresh, lllite_multiplier, cut_refresh, motion_refresh, cond_stagger=False,
                    flow_size=None) -> dict:
    if lllite not in (None, "random", "demo"):
        from pathlib import Path

        if not Path(lllite).is_file():
            raise StreameditError(f"LLLite adapter file {lllite!r} does not exist")
    return dict(lllite=lllite, hooks=hooks, cond_refresh_every=cond_refresh, lllite_multiplier=lllite_multiplier,
                cut_refresh=cut_refresh, motion_refresh=motion_refresh, cond_stagger=cond_stagger, flow_size=flow_size)


def ray_options(fn):
    """stylize --ray and its shard options (streamedit.scale, docs/scale-out.md)."""
    opts = [
        click.option("--ray", "ray_address", is_flag=False, flag_value="local", default=None,
                     metavar="[ADDRESS|auto]",
                     help="Run as shards on a Ray cluster: 'auto' (the cluster of this node), HOST:PORT, "
                          "ray://HOST:PORT, or alone / 'local' (start one here). Needs streamedit[ray]."),
        click.option("--ray-gpus", type=click.FloatRange(0), default=None,
                     help="GPUs per shard task (default 1; 0 with --device cpu)."),
        click.option("--shard-frames", type=click.IntRange(1), default=600, show_default=True,
                     help="--ray: frames per shard (rounded up to whole batches)."),
        click.option("--warmup", type=click.IntRange(0), default=None,
                     help="--ray: frames before each shard run and dropped, carrying the temporal adapter's "
                          "state (default: one batch with --lllite, else 0)."),
    ]
    for opt in reversed(opts):
        fn = opt(fn)
    return fn


def te_size_option(fn):
    """--te-size (EngineConfig.te_size), shared by stylize, bench and eval."""
    return click.option("--te-size", type=click.Choice(["256", "512"]), default="512", show_default=True,
                        callback=lambda ctx, param, value: int(value),
                        help="The text encoder's view of a frame: 512 = upstream diffusers (LANCZOS, 256 image "
                             "tokens); 256 = the streaming paper's (BILINEAR, 64 image tokens, sequence padded to "
                             "256 tokens, mask passed to the U-Net).")(fn)


def speed_options(fn):
    """--te-fp8 / --skip-similar / --low-latency / --main-priority (EngineConfig fields, the LOW_LATENCY preset)."""
    opts = [
        click.option("--te-fp8", is_flag=True,
                     help="Approximation: FP8 text-encoder Linears (needs --te-fast and an FP8 GPU: Hopper/Ada)."),
        click.option("--skip-similar", type=click.FloatRange(0), default=None, metavar="T",
                     help="Re-emit the last output for frames whose 64x64 gray thumbnail differs from the last "
                          "stylized one by at most T levels (mean abs, 0-255); ~1 skips a static camera."),
        click.option("--low-latency", is_flag=True,
                     help="= --preset low-latency: batch 1, fast TE, compiled, each frame handed out as soon as done."),
        click.option("--main-priority/--no-main-priority", default=False,
                     help="Run the U-Net + decode stream at high CUDA priority (the TE stream fills its gaps)."),
    ]
    for opt in reversed(opts):
        fn = opt(fn)
    return fn


# stylize's parameters that a preset sets -> their EngineConfig field; a flag given on the command line wins
PRESET_PARAMS = {"batch": "batch_size", "compile_": "compile", "compile_mode": "compile_mode", "te_fast": "te_fast",
                 "te_batch_one": "te_batch_one", "te_refresh": "te_refresh_every", "te_size": "te_size",
                 "te_fp8": "te_fp8", "main_priority": "main_priority", "cond_stagger": "cond_stagger",
                 "flow_size": "flow_size"}
# When no --preset is given on CUDA: compile (the exact preset) unless the job is too short to earn it back.
# Measured on the H100 (random:real, 512^2, B=8; docs/benchmarks.md): starting the exact path costs ~145 s
# more than eager on a cold compile cache and ~8 s warm (first frame at 15.8 s against imports and loading),
# and saves at least 1/46 - 1/153 s a frame (the paper recipe's 46 fps, itself faster than all-eager, vs 153).
COMPILE_COST_S = {"cold": 145.0, "warm": 8.0}
SAVED_S_PER_FRAME = 1 / 46 - 1 / 153


def preset_option(fn):
    from ..config import PRESETS

    return click.option(
        "--preset", type=click.Choice(list(PRESETS)), default=None,
        help="Option bundle: exact (every exact speed-up), paper (the paper's recipe), max (exact + "
             "approximations), low-latency, eager. Default: exact on CUDA (eager for a job too short to earn "
             "its compile back), eager on CPU. Flags given with it override its values.")(fn)


def preset_fields(ctx, preset: str, fields: dict) -> dict:
    """``fields`` (the command's values, EngineConfig names) with ``preset``'s values wherever the user did not
    give that flag on the command line."""
    from click.core import ParameterSource

    from ..config import PRESETS

    given = {field for param, field in PRESET_PARAMS.items()
             if param in ctx.params and ctx.get_parameter_source(param) is ParameterSource.COMMANDLINE}
    if preset == "low-latency" and "batch_size" in given and fields.get("batch_size") != 1:
        raise StreameditError(f"--low-latency runs batch 1; drop --batch {fields['batch_size']} or --low-latency")
    if "compile" in given:  # --compile / --no-compile is about everything compiled: the VAE follows it
        given.add("compile_vae")
    return {**fields, **{k: v for k, v in PRESETS[preset].items() if k not in given}}


def auto_preset(cuda: bool, frames: int | None, warm: bool) -> tuple[str, str]:
    """The preset a run without --preset gets, and why (said at start-up)."""
    if not cuda:
        return "eager", "on CPU"
    cache = "warm" if warm else "cold"
    if frames is not None and frames * SAVED_S_PER_FRAME < COMPILE_COST_S[cache]:
        return "eager", (f"{frames} frames: compiling (about {COMPILE_COST_S[cache]:.0f} s on this {cache} compile "
                         "cache) would cost more than it saves; --preset exact compiles anyway")
    return "exact", ("compiled functions load from the compile cache" if warm else
                     "the first batch compiles (minutes); later runs load it from the compile cache")


def check_speed_flags(config, device: str) -> None:
    """Errors the engine would raise only after loading the model (minutes for the real one)."""
    if config.te_fp8 and not config.te_fast:
        raise StreameditError("--te-fp8 needs --te-fast (FP8 runs inside the fast text encoder)")
    if config.te_fp8 and not device.startswith("cuda"):
        raise StreameditError("--te-fp8 needs a CUDA GPU with FP8 tensor cores (device is cpu)")


def model_options(fn):
    """--model/--revision/--device/--dtype, shared by every command that loads a model."""
    fn = click.option("--dtype", type=click.Choice(DTYPES), default=None,
                      help="Default: bfloat16 on CUDA, float32 on CPU.")(fn)
    fn = click.option("--device", default=None, help="cpu or cuda (default: cuda when available).")(fn)
    fn = click.option("--revision", default=None, help="Hub revision (DreamLite-mobile: 'diffusers').")(fn)
    fn = click.option("--model", "model", default="demo", show_default=True,
                      help="Hub id, local diffusers folder, 'demo', 'random:real' or 'random:tiny'.")(fn)
    return fn


def check_size(size: int | None) -> None:
    """--size, when given, before anything is loaded (0 is not "the default")."""
    if size is not None and size <= 0:
        raise StreameditError(f"--size must be a positive number of pixels, got {size}")


def resolve_device(device: str | None, dtype: str | None):
    import torch

    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise StreameditError(f"--device {device} was asked for, but no CUDA GPU is available here (use --device cpu)")
    if device != "cpu" and not device.startswith("cuda"):
        raise StreameditError(f"unknown --device {device!r}: use cpu or cuda")
    dtype = dtype or ("bfloat16" if device.startswith("cuda") else "float32")
    return device, getattr(torch, dtype)


def load(model: str, revision, device, dtype):
    from ..models.loading import load_models

    if model == "demo":
        from ..models.loading import demo_available

        if not demo_available():
            logging.warning("the bundled demo model is not installed; using random:tiny (random weights)")
            model = "random:tiny"
    return load_models(model, device=device, dtype=dtype, revision=revision)
