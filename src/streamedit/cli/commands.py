"""``streamedit stylize`` and ``streamedit info``."""

from __future__ import annotations

import os
import signal
import sys
import time

import click

from ..errors import StreameditError
from .group import _sigterm_to_interrupt, cli
from .options import (auto_preset, check_size, check_speed_flags, lllite_options, load, model_options, preset_fields,
                      preset_option, ray_options, resolve_device, speed_options, te_size_option, temporal_config)

X264_PRESETS = ("ultrafast", "superfast", "veryfast", "faster", "fast", "medium", "slow", "slower", "veryslow")


@cli.command()
@click.argument("inputs", metavar="INPUT...", nargs=-1, required=True)
@click.option("-o", "--output", required=True,
              help="Output video file (.mp4, .mkv, .mov); with several inputs (--ray), a folder.")
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
@preset_option
@click.option("--compile/--no-compile", "compile_", default=False,
              help="torch.compile U-Net, VAE and (with --te-fast) TE into CUDA graphs (first batches pay for it).")
@click.option("--compile-mode", default="reduce-overhead", show_default=True)
@click.option("--te-fast/--no-te-fast", default=False,
              help="Static, sync-free text encoder (exact; compiled with --compile).")
@click.option("--te-batch-one", is_flag=True, help="Approximation: one TE pass per batch.")
@click.option("--te-refresh", default=1, show_default=True, help="Approximation: reuse the TE output N batches.")
@click.option("--keep-size", is_flag=True, help="Write the working size instead of scaling back to the input's.")
@click.option("--crop", is_flag=True, help="Centre-crop to a square (size x size) instead of keeping the aspect.")
@te_size_option
@speed_options
@click.option("--crf", type=click.IntRange(0, 51), default=18, show_default=True,
              help="Encoder quality (x264 CRF; 0 = lossless).")
@click.option("--encoder-preset", default="veryfast", show_default=True, type=click.Choice(X264_PRESETS),
              help="x264 speed preset: faster ones give bigger files at the same CRF (at 1080p the encoder can be "
                   "what bounds a fast GPU: superfast encodes about 1.5x faster than veryfast).")
@lllite_options
@ray_options
def stylize(inputs, output, prompt, model, revision, device, dtype, batch, steps, strength, size, seed, fixed_noise,
            preset, compile_, compile_mode, te_fast, te_batch_one, te_refresh, keep_size, crop, te_size, te_fp8,
            skip_similar, low_latency, main_priority, crf, encoder_preset, ray_address, ray_gpus, shard_frames, warmup,
            **temporal):
    """Stylize INPUT with an instruction and write OUTPUT (same fps, timestamps and audio).

    With --ray, several INPUTs (into the folder OUTPUT) or one long one, cut into shards on a Ray cluster."""
    from tqdm import tqdm

    from ..config import EngineConfig, clean_prompt
    from ..engine.stream import StreamEngine
    from ..models.loading import working_size
    from ..video.io import READ_AHEAD, VideoWriter, open_video

    check_size(size)
    size = working_size(size, model)
    if low_latency:
        if preset not in (None, "low-latency"):
            raise StreameditError(f"--low-latency is --preset low-latency: drop it or --preset {preset}")
        preset = "low-latency"
    ctx = click.get_current_context()
    fields = dict(prompt=clean_prompt(prompt),  # fail on a bad prompt before any slow loading
                  steps=steps, strength=strength, size=size, crop=crop, seed=seed, fixed_noise=fixed_noise,
                  batch_size=batch, compile=compile_, compile_mode=compile_mode, te_fast=te_fast,
                  te_batch_one=te_batch_one, te_refresh_every=te_refresh, te_size=te_size, te_fp8=te_fp8,
                  skip_similar=skip_similar, main_priority=main_priority, **temporal_config(**temporal))
    if ray_address is not None:
        _stylize_on_ray(ctx, inputs, output, fields, preset, model, revision, device, dtype, keep_size,
                        dict(crf=crf, encoder_preset=encoder_preset), ray_address, ray_gpus, shard_frames, warmup)
        return
    if len(inputs) > 1:
        raise StreameditError(f"{len(inputs)} inputs: stylize takes one (or several with --ray)")
    input_path = inputs[0]
    device, torch_dtype = resolve_device(device, dtype)
    cuda = device.startswith("cuda")
    chosen, why = (preset, "--preset") if preset else ("exact" if cuda else "eager", None)
    config = EngineConfig(**preset_fields(ctx, chosen, fields))
    check_speed_flags(config, device)
    source = open_video(input_path, size=size, keep_size=keep_size, crop=crop)
    config.frame_size = (source.info.height, source.info.width)  # the engine sets up for this aspect
    written, writer = 0, None
    t0 = time.perf_counter()
    restore = signal.signal(signal.SIGTERM, _sigterm_to_interrupt)
    try:
        with VideoWriter(output, source, crf=crf, preset=encoder_preset) as writer:
            models = load(model, revision, device, torch_dtype)
            if why is None:  # no --preset: compile only where the job earns it back
                chosen, why = auto_preset(cuda, source.info.frame_count, cuda and _compile_cache_warm(models, config))
                config = EngineConfig(**preset_fields(ctx, chosen, fields), frame_size=config.frame_size)
            click.echo(f"preset: {chosen} ({why})", err=True)
            engine = StreamEngine(models, config)
            t0 = time.perf_counter()
            bar = tqdm(total=source.info.frame_count, unit="frame", desc="stylize", dynamic_ncols=True,
                       disable=None)
            for frame in engine.run(source.frames(ahead=READ_AHEAD)):  # decode overlaps the model
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


def _stylize_on_ray(ctx, inputs, output, fields, preset, model, revision, device, dtype, keep_size, encoding,
                    address, gpus, shard_frames, warmup):
    """stylize --ray (scale.stylize): the engine options are this command's; the preset is chosen here, where
    no GPU may be (exact on GPU workers: a shard is long enough to earn its compile back)."""
    from ..config import EngineConfig
    from ..scale import require_ray

    require_ray()  # one line and exit 2 before anything else when the extra is missing
    if os.path.exists(address):
        raise StreameditError(f"--ray takes a cluster address, not a file ({address}): write `--ray local`, "
                              "`--ray auto` or `--ray HOST:PORT`, or put INPUT first")
    if device not in (None, "cpu") and not device.startswith("cuda"):
        raise StreameditError(f"unknown --device {device!r}: use cpu or cuda")
    gpus = (0.0 if device == "cpu" else 1.0) if gpus is None else gpus
    if device == "cpu" and gpus:
        raise StreameditError("--device cpu with --ray-gpus > 0: a CPU shard has no use for a GPU")
    chosen = preset or ("exact" if gpus else "eager")
    click.echo(f"preset: {chosen} ({'--preset' if preset else 'GPU shards' if gpus else 'CPU shards'})", err=True)
    config = EngineConfig(**preset_fields(ctx, chosen, fields))
    check_speed_flags(config, device or "cuda")
    warm = warmup if warmup is not None else (config.batch_size if config.lllite else 0)
    spec = dict(size=config.size, keep_size=keep_size, crop=config.crop, **encoding, model=model, revision=revision,
                device=device, dtype=dtype, config=config)
    from ..scale import stylize as scaled

    code = scaled.run(list(inputs), output, spec, batch=config.batch_size, address=address, gpus=gpus,
                      shard_frames=shard_frames, warmup=warm,
                      key=repr((model, revision, device, dtype, keep_size, sorted(encoding.items()),
                                sorted(fields.items()), chosen)))
    if code:
        sys.exit(code)


def _compile_cache_warm(models, config) -> bool:
    """Whether the compile cache holds this run's compiled functions (config: the exact preset's)."""
    from ..accel import compile_cache
    from ..config import engine_shape

    return compile_cache.is_warm(compile_cache.artifact_key(models, config, engine_shape(models, config)))


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
    from ..models.loading import describe
    from ..temporal.hooks import hook_split

    rows, models = describe(model if model != "demo" else _demo_or_tiny(), revision=revision)
    click.echo(f"model: {model}" + (" (built on the meta device: no weights allocated)"
                                    if model.startswith("random:") else ""))
    for name, cls, n in rows:
        click.echo(f"  {name:<13} {cls:<36} {_count(n):>9} params" if n else f"  {name:<13} {cls}")
    click.echo(f"  {'total':<13} {'':<36} {_count(sum(n for _, _, n in rows)):>9} params")
    split = hook_split(models.unet)
    click.echo(f"hook sites: {sum(split.values())} (down {split['down']} / mid {split['mid']} / up {split['up']})")
    click.echo(f"edit template prefix dropped from the TE output: {models.edit_prefix_len} tokens")
    from ..models.components import TE_FEATURES

    click.echo(f"text-encoder features: {models.te_features}: {TE_FEATURES[models.te_features]}")
    if lllite:
        from ..temporal.adapter import LLLiteAdapter

        if models.device.type == "meta":  # adapter weights need real storage
            models = load(model, revision, "cpu", __import__("torch").float32)
        from ..temporal.attach import adapter_path

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
