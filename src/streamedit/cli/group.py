"""Command line: ``streamedit stylize | info | bench | eval | serve | live | train``.

Every user mistake ends in one line on stderr and exit code 2; Ctrl-C / SIGTERM end any command
with one line and exit code 130 (during start-up too); during ``stylize`` they leave a finalized,
playable file with every frame processed so far.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import time

import click

from ..errors import StreameditError

DTYPES = ("float32", "bfloat16", "float16")


# Commands that live with their mechanism, imported on first use (they import this module).
LAZY_COMMANDS = {"bench": ("streamedit.bench", "bench_command"), "eval": ("streamedit.eval.run", "eval_command"),
                 "serve": ("streamedit.serve", "serve_command"), "live": ("streamedit.serve", "live_command"),
                 "train": ("streamedit.train.cli", "train_command")}


class _Group(click.Group):
    """Lazy subcommands; StreameditError (and unexpected errors) become one line + exit 2, no traceback."""

    lazy = LAZY_COMMANDS

    def list_commands(self, ctx):
        return sorted({*super().list_commands(ctx), *self.lazy})

    def get_command(self, ctx, name):
        if name in self.lazy:
            import importlib

            module, attr = self.lazy[name]
            return getattr(importlib.import_module(module), attr)
        return super().get_command(ctx, name)

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except StreameditError as exc:
            click.echo(f"error: {exc}", err=True)
            sys.exit(2)
        except KeyboardInterrupt:  # Ctrl-C or SIGTERM (main) where no command said more: one line, 130
            click.echo("\ninterrupted", err=True)
            sys.exit(130)
        except (click.exceptions.Exit, click.exceptions.Abort, click.ClickException, SystemExit):
            raise
        except Exception as exc:  # a bug, not a user error: still one line unless asked for more
            if os.environ.get("STREAMEDIT_DEBUG"):
                raise
            click.echo(f"error: {type(exc).__name__}: {exc} (set STREAMEDIT_DEBUG=1 for the traceback)", err=True)
            sys.exit(1)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-v", "--verbose", is_flag=True, help="Show library warnings and debug logs.")
def cli(verbose: bool):
    """Real-time video stylization with an instruction-edit diffusion model."""
    setup_logging(verbose)


def setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="%(levelname)s: %(message)s",
                        stream=sys.stderr, force=True)
    if not verbose:
        for name in ("diffusers", "transformers", "httpx", "huggingface_hub", "torch", "PIL"):
            logging.getLogger(name).setLevel(logging.ERROR)
        from diffusers.utils import logging as dlog
        from transformers.utils import logging as tlog
        dlog.set_verbosity_error()
        dlog.disable_progress_bar()
        tlog.set_verbosity_error()


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
        click.option("--cond-stagger", is_flag=True,
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
                     help="Batch 1, fast TE, compiled, 1 batch prefetched, each frame handed out as soon as done."),
        click.option("--main-priority", is_flag=True,
                     help="Run the U-Net + decode stream at high CUDA priority (the TE stream fills its gaps)."),
    ]
    for opt in reversed(opts):
        fn = opt(fn)
    return fn


def low_latency_fields(ctx, batch: int) -> dict:
    """The --low-latency preset (engine_config.LOW_LATENCY); an explicit --batch other than 1 conflicts."""
    from click.core import ParameterSource

    from ..config import LOW_LATENCY

    if ctx.get_parameter_source("batch") is ParameterSource.COMMANDLINE and batch != 1:
        raise StreameditError(f"--low-latency runs batch 1; drop --batch {batch} or --low-latency")
    return dict(LOW_LATENCY)


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


@cli.command()
@click.argument("input_path", metavar="INPUT")
@click.option("-o", "--output", required=True, help="Output video file (.mp4, .mkv, .mov).")
@click.option("-p", "--prompt", required=True, help="The edit instruction, e.g. 'oil painting'.")
@model_options
@click.option("--batch", default=8, show_default=True, help="Frames per batch.")
@click.option("--steps", default=1, show_default=True, help="Denoising steps (1-4).")
@click.option("--strength", type=click.FloatRange(0.0, 1.0, min_open=True), default=None,
              help="Start sigma in (0, 1]: 1 starts from pure noise; lower starts from the noised source "
                   "(default: the model's own, 1 unless its streamedit.json says otherwise).")
@click.option("--size", type=int, default=None,
              help="Working resolution: the long side (the short side keeps the input's aspect, rounded to 32). "
                   "Default: the model's own (256 for demo), else 512.")
@click.option("--seed", default=0, show_default=True)
@click.option("--fixed-noise", is_flag=True, help="Start every frame from the same noise (less flicker).")
@click.option("--compile", "compile_", is_flag=True,
              help="torch.compile U-Net, VAE and (with --te-fast) TE into CUDA graphs (first batches pay for it).")
@click.option("--compile-mode", default="reduce-overhead", show_default=True)
@click.option("--te-fast", is_flag=True, help="Static, sync-free text encoder (exact; compiled with --compile).")
@click.option("--te-batch-one", is_flag=True, help="Approximation: one TE pass per batch.")
@click.option("--te-refresh", default=1, show_default=True, help="Approximation: reuse the TE output N batches.")
@click.option("--keep-size", is_flag=True, help="Write the working size instead of scaling back to the input's.")
@click.option("--crop", is_flag=True, help="Centre-crop to a square (size x size) instead of keeping the aspect.")
@te_size_option
@speed_options
@lllite_options
def stylize(input_path, output, prompt, model, revision, device, dtype, batch, steps, strength, size, seed, fixed_noise,
            compile_, compile_mode, te_fast, te_batch_one, te_refresh, keep_size, crop, te_size, te_fp8, skip_similar,
            low_latency, main_priority, **temporal):
    """Stylize INPUT with an instruction and write OUTPUT (same fps, timestamps and audio)."""
    from tqdm import tqdm

    from ..engine.stream import EngineConfig, StreamEngine
    from ..video.io import VideoWriter, open_video
    from ..models.loading import working_size

    check_size(size)
    size = working_size(size, model)
    fields = dict(batch_size=batch, compile=compile_, te_fast=te_fast, te_size=te_size, te_fp8=te_fp8,
                  skip_similar=skip_similar, main_priority=main_priority)
    if low_latency:
        fields.update(low_latency_fields(click.get_current_context(), batch))
    config = EngineConfig(prompt=prompt, steps=steps, strength=strength, size=size, crop=crop, seed=seed,
                          fixed_noise=fixed_noise,
                          compile_mode=compile_mode, te_batch_one=te_batch_one, te_refresh_every=te_refresh,
                          **fields, **temporal_config(**temporal))
    from ..engine.stream import clean_prompt

    config.prompt = clean_prompt(prompt)  # fail on a bad prompt before any slow loading
    device, torch_dtype = resolve_device(device, dtype)
    check_speed_flags(config, device)
    source = open_video(input_path, size=size, keep_size=keep_size, crop=crop)
    config.frame_size = (source.info.height, source.info.width)  # the engine sets up for this aspect
    written, writer = 0, None
    t0 = time.perf_counter()
    restore = signal.signal(signal.SIGTERM, _sigterm_to_interrupt)
    try:
        with VideoWriter(output, source) as writer:
            engine = StreamEngine(load(model, revision, device, torch_dtype), config)
            t0 = time.perf_counter()
            bar = tqdm(total=source.info.frame_count, unit="frame", desc="stylize", dynamic_ncols=True,
                       disable=None)
            for frame in engine.run(source.frames()):
                writer.write(frame)
                written += 1
                bar.update(1)
                bar.set_postfix(fps=f"{written / (time.perf_counter() - t0):.1f}", refresh=False)
            bar.close()
            engine.close()
    except KeyboardInterrupt:
        click.echo(f"\n{_interrupted(writer, output)}", err=True)
        sys.exit(130)
    finally:
        signal.signal(signal.SIGTERM, restore)
    wall = time.perf_counter() - t0
    peak = ""
    if device.startswith("cuda"):
        import torch

        peak = f", peak GPU memory {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB"
    click.echo(f"{written} frames in {wall:.1f} s ({written / max(wall, 1e-9):.1f} fps{peak}) -> {output}")
    if source.warning:
        click.echo(f"error: {source.warning}", err=True)
        sys.exit(2)


def _sigterm_to_interrupt(signum, frame):
    raise KeyboardInterrupt


def _interrupted(writer, output) -> str:
    """What an interrupted stylize leaves behind, truly: frames saved, or nothing written."""
    saved = writer.frames_written if writer is not None else 0
    if saved:
        return f"interrupted: {saved} stylized frames saved to {output}"
    if os.path.exists(output):
        return f"interrupted before the first stylized frame: {output} was left as it was"
    return f"interrupted before the first stylized frame: nothing was written ({output} not created)"


@cli.command()
@model_options
@click.option("--lllite", default=None, help="Also load this adapter and list its hooks.")
@click.option("--hooks", default=None, help="Hook subset to attach (default: every hook in the file).")
def info(model, revision, device, dtype, lllite, hooks):
    """Print each component's class and parameter count, and the LLLite hook sites."""
    from ..models.loading import describe, hook_split

    rows, models = describe(model if model != "demo" else _demo_or_tiny(), revision=revision)
    click.echo(f"model: {model}" + (" (built on the meta device: no weights allocated)"
                                    if model.startswith("random:") else ""))
    for name, cls, n in rows:
        click.echo(f"  {name:<13} {cls:<36} {_count(n):>9} params" if n else f"  {name:<13} {cls}")
    click.echo(f"  {'total':<13} {'':<36} {_count(sum(n for _, _, n in rows)):>9} params")
    split = hook_split(models.unet)
    click.echo(f"hook sites: {sum(split.values())} (down {split['down']} / mid {split['mid']} / up {split['up']})")
    click.echo(f"edit template prefix dropped from the TE output: {models.edit_prefix_len} tokens")
    from ..text.exact import FEATURES

    click.echo(f"text-encoder features: {FEATURES}")
    if lllite:
        from ..temporal.adapter import LLLiteAdapter

        if models.device.type == "meta":  # adapter weights need real storage
            models = load(model, revision, "cpu", __import__("torch").float32)
        from ..config import adapter_path

        adapter = LLLiteAdapter.load(adapter_path(lllite), models.unet, hooks=hooks)
        cfg = adapter.config
        parts = {p: sum(h.startswith(p) for h in adapter.hooks) for p in ("down", "mid", "up")}
        click.echo(f"lllite: {lllite}: {len(adapter.hooks)} hooks (down {parts['down']} / mid {parts['mid']} / "
                   f"up {parts['up']}), cond_emb_dim {cfg.cond_emb_dim}, mlp_dim {cfg.mlp_dim}, "
                   f"cond image {cfg.cond_size}, {sum(p.numel() for p in adapter.parameters()) / 1e6:.2f} M params, "
                   f"flow convention {cfg.flow}")
        for hook in adapter.hooks:
            click.echo(f"  {hook}")


def _count(n: int) -> str:
    return f"{n / 1e9:.3f} B" if n >= 1e8 else f"{n / 1e6:.3f} M"


def _demo_or_tiny() -> str:
    from ..models.loading import demo_available

    return "demo" if demo_available() else "random:tiny"


def main() -> None:
    # SIGTERM as Ctrl-C from the start (model loading included): one line and exit 130, not a silent death
    # (_Group.invoke prints it; this module imports no torch, so that covers every slow import too)
    signal.signal(signal.SIGTERM, _sigterm_to_interrupt)
    cli(prog_name="streamedit")


if __name__ == "__main__":
    main()
