"""``streamedit train base``: the bundled demo edit model, trained to imitate classic filters.

Architecture: the runtime's own classes at small sizes (``models.DEMO_*``): ``DreamLiteUNetModel``,
an ``AutoencoderTiny`` and a ``Qwen3VLForConditionalGeneration`` with the offline BPE tokenizer.
The TE stays frozen at its random initialisation: it is a fixed, deterministic feature map of
(frame, instruction) and the U-Net's cross-attention learns to read the instruction from it, which
is all four styles need.

Recipe (GPU minutes, see docs/demo-model.md):

1. data: augmented crops of every training frame and their filtered targets (``data.py``);
2. VAE: encoder + decoder on sources and targets alike (L1 + MSE + Sobel-gradient loss; a small
   latent L2 keeps the latents bounded). Its ``scaling_factor`` is then set so the model-space latents
   have std ``latent_std`` (2): the 1-step output is ``noise - v``, and any noise the U-Net fails to
   reproduce in ``v`` lands in the image divided by that scale;
3. latents and TE embeddings of every crop are computed once (both frozen from here on);
4. U-Net: flow matching with the runtime's edit conditioning, ``unet(cat([x_sigma, z_source], W))``,
   velocity target ``(x_sigma - z_target) / sigma``. Most of each batch sits at the 1-step operating
   point the runtime uses: start sigma ``strength`` (shifted as the runtime shifts it), where the sample
   is the runtime's first sample (``denoise.start_sample``: the source latent noised to that sigma) and
   ``x0 = x - sigma * v``; the rest is logit-normal sigma below it, on the target's own flow.
   Part of the operating-point share also gets a pixel loss through the decoder (frozen, or with
   ``--joint-decoder`` trained by it in the same steps).
   Why ``strength < 1`` (0.08 by default): the width-concat puts the clean source W latent columns
   away from the output, and a U-Net this small cannot route fine detail that far (at strength 1
   the first attempts stalled at 16 dB, docs/demo-model.md); the noised source puts it in place.
   On CUDA each step replays from a CUDA graph (``unet.py``: at batch 128 the eager step waits on the host);
5. decoder: tuned on the EMA U-Net's own 1-step latents against the targets (``unet.tune_decoder``),
   since those, not clean latents, are all the runtime ever decodes;
6. the EMA U-Net and the VAE are saved in float16 as a diffusers folder plus ``streamedit.json``
   naming the instructions the model knows and its ``strength``.

``--init-from MODEL`` continues training a model this command saved (one GPU call caps a run at
10 minutes): its VAE, TE and ``scaling_factor`` are kept, so stage 2 is skipped and stage 3 computes
the same latents and embeddings; the U-Net starts from its weights (with a fresh optimizer and a short
LR warm-up) and the decoder is tuned again.
"""

from __future__ import annotations

import copy
import json
import logging
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import click
import numpy as np
import torch

from .common import autocast, to_pm1
from .data import STYLE_NAMES, build_examples, split_clips, validation_frames, with_targets
from .unet import train_unet, tune_decoder
from .vae import new_decoder, train_vae

log = logging.getLogger(__name__)


@dataclass
class BaseTrainConfig:
    size: int = 256
    crops_per_frame: int = 8
    max_frames: int | None = None  # per clip (None: all)
    vae_steps: int = 4000
    vae_batch: int = 64
    vae_lr: float = 1e-3
    unet_steps: int = 6000
    unet_batch: int = 128  # CUDA-graphed steps (unet.py): more, smaller steps in the same minutes

    unet_lr: float = 6e-4
    one_step_fraction: float = 0.75  # share of each batch at the operating point
    strength: float | None = 0.08  # the runtime's start sigma (saved in streamedit.json); None: init_from's
    pixel_batch: int = 32  # samples of each batch that also get the decoder's pixel loss
    latent_std: float = 2.0  # target std of the model-space latents (see _set_latent_scale)
    unet_minutes: float | None = None  # wall-clock budget: the step count is cut to fit after 50 steps
    pixel_weight: float = 0.5  # x L1 of the decoded operating-point samples (the velocity MSE grows as 1/strength^2)
    joint_decoder: bool = False  # the decoder also trains on that pixel loss, in the U-Net's steps
    ema: float = 0.999
    decoder_steps: int = 1500  # decoder tuned on the U-Net's outputs (0: keep the VAE's own decoder)
    decoder_lr: float = 3e-4
    seed: int = 0
    workers: int | None = None
    init_from: str | None = None  # a model folder saved by train base: continue from it (no VAE stage)
    # a new U-Net: these keys of the current U-Net's config changed (None: keep); with init_from, on its VAE and TE
    unet_channels: tuple[int, ...] | None = None  # block_out_channels, multiples of 32 (GroupNorm)
    unet_heads: tuple[int, ...] | None = None  # attention heads per block (attention_head_dim in the config)
    unet_layers: tuple[int, ...] | None = None  # transformer layers per block
    # a new VAE decoder (AutoencoderTiny: one width for all stages); with init_from, on its encoder
    decoder_channels: int | None = None
    decoder_blocks: tuple[int, ...] | None = None  # AutoencoderTinyBlocks per stage (demo: 2,2,2,0)


@torch.no_grad()
def _encode_all(vae, images: torch.Tensor, chunk: int = 64) -> torch.Tensor:
    out = []
    for i in range(0, len(images), chunk):
        with autocast(images.device):
            out.append(vae.encode(to_pm1(images[i:i + chunk])).latents.float())
    return torch.cat(out)


def precompute(models, sources: np.ndarray, src_t: torch.Tensor, tgt_t: torch.Tensor,
               latent_std: float | None) -> dict:
    """Stage 3: what the U-Net trains on, computed once with the trained VAE and the frozen TE (``sources``:
    the crops as numpy for the TE, ``src_t``/``tgt_t`` the same crops/targets on the device). With a
    ``latent_std`` it also sets the VAE's ``scaling_factor`` so the model-space latents have that std
    (None: keep the model's own, as a continued run must)."""
    data = {"z_src": _encode_all(models.vae, src_t), "targets": tgt_t,
            "z_tgt": _encode_all(models.vae, tgt_t.flatten(0, 1)).unflatten(0, tgt_t.shape[:2]),
            "emb": _embed_all(models, sources)}
    if latent_std is not None:
        models.vae.register_to_config(scaling_factor=latent_std / float(data["z_src"].std()))
    return data


@torch.no_grad()
def _embed_all(models, sources: np.ndarray, chunk: int = 32) -> list[torch.Tensor]:
    """Per style, (N, tokens, hidden) TE embeddings through the runtime's own TextEncoderRunner.

    Instructions tokenize to different lengths, so each style keeps its own tensor.
    """
    from concurrent.futures import ThreadPoolExecutor

    from ..text.exact import TextEncoderRunner

    te = TextEncoderRunner(models)
    chunks = [list(sources[i:i + chunk]) for i in range(0, len(sources), chunk)]
    rows = {name: [] for name in STYLE_NAMES}
    with ThreadPoolExecutor(8) as pool:  # PIL resize + image processor on the CPU, ahead of the GPU
        for images, frames in zip(pool.map(te.prepare_images, chunks), chunks):
            for name in STYLE_NAMES:
                emb = te.encode(name, images, len(frames))
                rows[name].append(emb.to(torch.bfloat16) if emb.is_cuda else emb)  # autocast reads bf16
    return [torch.cat(rows[name]) for name in STYLE_NAMES]


@torch.no_grad()
def validate(models, frames: np.ndarray, targets: np.ndarray, size: int, batch: int = 16) -> dict:
    """PSNR (dB, mean over frames) of the 1-step model output and of the VAE round trip, per style."""
    from ..config import EngineConfig
    from ..engine.stream import StreamEngine
    from ..eval.metrics import psnr_per_frame

    report = {}
    for k, name in enumerate(STYLE_NAMES):
        engine = StreamEngine(models, EngineConfig(prompt=name, batch_size=batch, size=size, pipeline=False))
        outputs = np.stack(list(engine.run(list(frames))))
        engine.close()
        report[name] = {"psnr": float(np.mean(psnr_per_frame(outputs, targets[:, k])))}
    recon = _roundtrip(models, targets.reshape(-1, *targets.shape[2:]))
    flat = targets.reshape(-1, *targets.shape[2:])
    report["vae_roundtrip_psnr"] = float(np.mean(psnr_per_frame(recon, flat)))
    report["mean_psnr"] = float(np.mean([report[n]["psnr"] for n in STYLE_NAMES]))
    return report


def _roundtrip(models, images: np.ndarray, chunk: int = 64) -> np.ndarray:
    from ..diffusion.denoiser import Denoiser

    den = Denoiser(models, 1, images.shape[1])
    out = []
    for i in range(0, len(images), chunk):
        x = torch.from_numpy(images[i:i + chunk]).to(models.device)
        out.append(den.decode(den.encode_source(x) * den.scaling).cpu().numpy())  # raw -> model-space latents
    return np.concatenate(out)


def train_base(clips: str, out: str, holdout: list[str], cfg: BaseTrainConfig, device: str = "cpu",
               progress: bool = True) -> dict:
    """Train the demo model on a folder of clips and save it to ``out``; returns the report."""
    from tqdm import tqdm

    from ..models.loading import default_strength

    t_start = time.perf_counter()
    device = torch.device(device)
    train_clips, val_clips = split_clips(clips, holdout)
    models = _initial_models(cfg, device)  # before the minute of data building: a bad --init-from fails now
    models.unet = _new_unet(models, cfg) or models.unet  # so do bad --unet-* values
    vae, fit_decoder = new_decoder(models, cfg)
    models.vae = vae or models.vae
    if cfg.strength is None:
        cfg = replace(cfg, strength=default_strength(models) if cfg.init_from else BaseTrainConfig.strength)
    t0 = time.perf_counter()
    sources, targets = build_examples(train_clips, cfg.size, cfg.crops_per_frame, cfg.seed, cfg.max_frames,
                                      cfg.workers)
    t_data = time.perf_counter() - t0
    vae_steps = 0 if cfg.init_from else cfg.vae_steps
    src_t = torch.from_numpy(sources).to(device)
    tgt_t = torch.from_numpy(targets).to(device)
    rows: list[dict] = []
    fit_steps = cfg.decoder_steps if fit_decoder else 0
    bar = tqdm(total=vae_steps + fit_steps + cfg.unet_steps + cfg.decoder_steps, unit="step", desc="train base",
               disable=not progress)
    t0 = time.perf_counter()
    if vae_steps:
        train_vae(models.vae, torch.cat([src_t, tgt_t.flatten(0, 1)]), cfg, rows, bar)
    t_vae = time.perf_counter() - t0
    t0 = time.perf_counter()
    data = precompute(models, sources, src_t, tgt_t, None if cfg.init_from else cfg.latent_std)
    models.extras["strength"] = cfg.strength  # the runtime's default for this model (validate() runs it)
    t_pre = time.perf_counter() - t0
    t_fit = 0.0
    if fit_steps:  # a random decoder is fitted to the current U-Net first: the pixel loss decodes with it
        t0 = time.perf_counter()
        tune_decoder(models, data, replace(cfg, decoder_lr=cfg.vae_lr), rows, bar)
        t_fit = time.perf_counter() - t0
    t0 = time.perf_counter()
    models.unet = train_unet(models, data, cfg, rows, bar)
    t_unet = time.perf_counter() - t0
    report = {"config": asdict(cfg), "train_clips": [p.name for p in train_clips], "holdout": [p.name for p in val_clips],
              "examples": len(sources), "latent_std": float(data["z_src"].std()),
              "scaling_factor": models.vae.config.scaling_factor,
              "seconds": {"data": t_data, "vae": t_vae, "precompute": t_pre, "decoder_fit": t_fit, "unet": t_unet},
              "log": rows}
    val = None
    if val_clips:
        frames = validation_frames(val_clips, cfg.size, cfg.max_frames)
        val = (frames, with_targets(frames, cfg.workers))
    if cfg.decoder_steps:
        if val is not None:  # what the decoder tuning adds
            report["validation_before_decoder_tune"] = validate(models, *val, cfg.size)
        t0 = time.perf_counter()
        tune_decoder(models, data, cfg, rows, bar)
        report["seconds"]["decoder"] = time.perf_counter() - t0
    bar.close()
    del data, src_t, tgt_t
    save_demo(models, out, cfg.size)
    if val is not None:
        report["validation"] = validate(models, *val, cfg.size)
    report["seconds"]["total"] = time.perf_counter() - t_start
    Path(out, "train_report.json").write_text(json.dumps(report, indent=1))
    return report


def _initial_models(cfg: BaseTrainConfig, device: torch.device):
    """Fresh random demo-size models, or (``init_from``) a saved model to continue, in float32."""
    from ..errors import StreameditError
    from ..models.architectures import build_random
    from ..models.loading import load_models

    if not cfg.init_from:
        return build_random("demo", device=device, dtype=torch.float32, seed=cfg.seed)
    if not Path(cfg.init_from, "streamedit.json").is_file():
        raise StreameditError(f"--init-from {cfg.init_from!r} is not a model saved by `streamedit train base` "
                              "(no streamedit.json)")
    models = load_models(cfg.init_from, device=device, dtype=torch.float32)
    if "instructions" not in models.extras or "strength" not in models.extras:
        raise StreameditError(f"--init-from {cfg.init_from!r} is not a model saved by `streamedit train base` "
                              "(its streamedit.json names no instructions or strength)")
    if models.extras["instructions"] != STYLE_NAMES or models.extras.get("size", cfg.size) != cfg.size:
        raise StreameditError(f"--init-from {cfg.init_from!r} was trained for other instructions or another size "
                              f"({models.extras['instructions']}, {models.extras.get('size')})")
    for name in ("unet", "vae", "text_encoder"):
        getattr(models, name).requires_grad_(False)
    return models


def _new_unet(models, cfg: BaseTrainConfig):
    """With any ``--unet-*`` option: a randomly initialised U-Net of the current one's config (the demo's, or the
    ``--init-from`` model's) with those keys changed, float32 on the models' device; else None."""
    from ..errors import StreameditError

    config = models.unet.config
    given = {"block_out_channels": cfg.unet_channels, "attention_head_dim": cfg.unet_heads,
             "transformer_layers_per_block": cfg.unet_layers}
    override = {k: tuple(v) for k, v in given.items() if v}
    if not override:
        return None
    merged = {k: tuple(override.get(k, config[k])) for k in given}
    blocks = len(config["down_block_types"])
    if any(len(v) != blocks for v in merged.values()):
        raise StreameditError(f"--unet-channels/--unet-heads/--unet-layers need {blocks} values (one per block), got "
                              + ", ".join(f"{k}={','.join(map(str, v))}" for k, v in merged.items()))
    for ch, heads in zip(merged["block_out_channels"], merged["attention_head_dim"]):
        if ch % 32 or ch % heads:
            raise StreameditError(f"U-Net channels {ch}: must be a multiple of 32 and of its {heads} head(s)")
    torch.manual_seed(cfg.seed)
    return type(models.unet).from_config(config, **override).to(models.device, torch.float32).eval()


def save_demo(models, out: str, size: int) -> None:
    """float16 diffusers folder + ``streamedit.json`` (known instructions, native size, strength)."""
    half = copy.copy(models)
    for name in ("unet", "vae", "text_encoder"):
        setattr(half, name, copy.deepcopy(getattr(models, name)).to("cpu", torch.float16))
    half.save_pretrained(out)
    for name in ("unet", "vae"):  # a model loaded for --init-from records its folder: not ours to ship
        config = Path(out, name, "config.json")
        config.write_text(json.dumps({k: v for k, v in json.loads(config.read_text()).items() if k != "_name_or_path"},
                                     indent=2, sort_keys=True) + "\n")
    meta = {"instructions": STYLE_NAMES, "size": size, "strength": models.extras.get("strength", 1.0),
            "te_features": models.te_features,  # what the U-Net was trained on (TextEncoderRunner's)
            "about": "streamedit demo model: imitates OpenCV filters (see docs/demo-model.md)"}
    Path(out, "streamedit.json").write_text(json.dumps(meta, indent=2))


def _int_list(ctx, param, value, least: int = 1):
    if value is None:
        return None
    try:
        values = tuple(int(v) for v in value.split(","))
    except ValueError:
        values = ()
    if not values or min(values) < least:
        kind = "positive integers" if least else "integers >= 0"
        raise click.BadParameter(f"expected {kind} separated by commas, got {value!r}")
    return values


@click.command("base")
@click.option("--clips", required=True, help="Folder of video clips to train on.")
@click.option("-o", "--output", required=True, help="Output folder (a diffusers pipeline folder).")
@click.option("--holdout", multiple=True, help="Clip name (file stem) kept out for validation; repeatable.")
@click.option("--size", default=256, show_default=True)
@click.option("--crops", default=8, show_default=True, help="Augmented crops per training frame.")
@click.option("--max-frames", type=int, default=None, help="Frames per clip (default: all).")
@click.option("--vae-steps", default=4000, show_default=True)
@click.option("--unet-steps", default=6000, show_default=True)
@click.option("--batch", default=128, show_default=True, help="U-Net batch size.")
@click.option("--vae-batch", default=64, show_default=True)
@click.option("--lr", default=6e-4, show_default=True, help="U-Net learning rate.")
@click.option("--strength", type=click.FloatRange(0.0, 1.0, min_open=True), default=None,
              help="Start sigma the model is trained for (1: pure noise, as DreamLite); saved as its default. "
                   "Default: 0.08, or the --init-from model's own.")
@click.option("--init-from", type=click.Path(exists=True, file_okay=False), default=None,
              help="Continue training a model folder this command saved (keeps its VAE and TE; no VAE stage).")
@click.option("--unet-minutes", type=float, default=None, help="Cut the U-Net steps to fit this wall-clock budget.")
@click.option("--pixel-weight", type=click.FloatRange(min=0.0), default=0.5, show_default=True,
              help="Weight of the image loss (L1 of decoded 1-step outputs). The velocity loss grows as 1/strength^2, "
                   "so a low --strength needs more to keep the image term's share.")
@click.option("--one-step-fraction", type=click.FloatRange(0.0, 1.0, min_open=True), default=0.75, show_default=True,
              help="Share of each batch at the runtime's 1-step operating point (the rest: lower sigmas).")
@click.option("--joint-decoder", is_flag=True, help="Train the decoder together with the U-Net on the image loss "
              "(--pixel-weight), not only after it.")
@click.option("--decoder-steps", default=1500, show_default=True,
              help="Steps tuning the decoder on the U-Net's own outputs (0: skip).")
@click.option("--unet-channels", callback=_int_list, help="U-Net block channels, e.g. 64,160,256. Any --unet-* option "
              "trains a new U-Net; the others keep the current U-Net's values (the demo's, or the --init-from model's, "
              "whose VAE and TE are kept).")
@click.option("--unet-heads", callback=_int_list, help="Attention heads per U-Net block (demo: 1,2,3).")
@click.option("--unet-layers", callback=_int_list, help="Transformer layers per U-Net block (demo: 1,1,2).")
@click.option("--decoder-channels", type=click.IntRange(min=8), default=None,
              help="Width of a new VAE decoder (all stages). Either --decoder-* option gives a new decoder, on the "
                   "--init-from model's encoder: blocks added at the same width grow its decoder exactly, anything "
                   "else starts a random one, fitted to its U-Net first; then tuned as usual.")
@click.option("--decoder-blocks", callback=lambda c, p, v: _int_list(c, p, v, least=0),
              help="Blocks per stage of a new VAE decoder (demo: 2,2,2,0; low-resolution stages are cheap).")
@click.option("--seed", default=0, show_default=True)
@click.option("--device", default=None, help="cuda (default when available) or cpu.")
def base_command(clips, output, holdout, size, crops, max_frames, vae_steps, unet_steps, batch, vae_batch, lr, strength,
                 unet_minutes, pixel_weight, one_step_fraction, joint_decoder, decoder_steps, unet_channels, unet_heads,
                 unet_layers, decoder_channels, decoder_blocks, seed, init_from, device):
    """Train the small demo edit model to imitate the built-in filters; writes a model folder."""
    from ..cli.options import resolve_device

    if joint_decoder and not pixel_weight:
        raise click.UsageError("--joint-decoder trains the decoder on the image loss: it needs --pixel-weight > 0")
    device, _ = resolve_device(device, None)
    cfg = BaseTrainConfig(size=size, crops_per_frame=crops, max_frames=max_frames, vae_steps=vae_steps,
                          unet_steps=unet_steps, unet_batch=batch, vae_batch=vae_batch, unet_lr=lr, strength=strength,
                          unet_minutes=unet_minutes, pixel_weight=pixel_weight, one_step_fraction=one_step_fraction,
                          joint_decoder=joint_decoder, decoder_steps=decoder_steps, seed=seed, init_from=init_from,
                          unet_channels=unet_channels, unet_heads=unet_heads, unet_layers=unet_layers,
                          decoder_channels=decoder_channels, decoder_blocks=decoder_blocks)
    report = train_base(clips, output, list(holdout), cfg, device)
    secs = report["seconds"]
    click.echo(f"trained on {report['examples']} crops in {secs['total']:.0f} s -> {output}")
    for name, row in report.get("validation", {}).items():
        if isinstance(row, dict):
            click.echo(f"  {name:<14} PSNR {row['psnr']:.2f} dB (held-out)")

