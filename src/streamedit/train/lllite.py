"""Train a temporal LLLite adapter on teacher pairs: ``streamedit train lllite``.

Flow matching in the runtime's own conventions (see :mod:`streamedit.diffusion.denoiser`):

* clean latent of a target image ``x``: ``z0 = (vae.encode(x).latents - shift) * scaling``, the inverse
  of ``Denoiser.decode`` (``denoise.vae_image``: ``vae.decode(z / scaling + shift)``); the source
  latents are the raw ``vae.encode`` latents, exactly as ``Denoiser.encode_source`` feeds them;
* per example a sigma: the 1-step operating point (the model's start sigma: 1, or its ``strength``
  shifted) with probability ``p_one``, else drawn uniformly from a 1000-point schedule below it built
  by the model's scheduler with the same dynamic shift ``mu`` as the runtime, so sigma and timestep
  come from ``set_timesteps`` itself;
* ``x = (1 - sigma) * z0 + sigma * noise`` (at the operating point of a ``strength < 1`` model, the
  runtime's first sample ``denoise.start_sample`` from the source latent instead), velocity target
  ``(x - z0) / sigma`` (``noise - z0`` for the former: the Euler step ``x + (0 - sigma) * v`` then
  lands on ``z0``); the U-Net is called as ``Denoiser.denoise`` calls it
  (noisy and source latents concatenated along width, ``time_ids = (size, size)``, left half kept).

With ``pixel_weight > 0`` the operating-point examples also get an image loss: their 1-step output
``x - sigma * v`` is decoded by the frozen VAE and compared with the target frame (L1 + MSE + Sobel-
gradient L1, ``common.image_loss``). A latent MSE alone lets the adapter buy stability with blur (the
paper's smoothing trap: it averages what it cannot predict); the gradient term charges for lost edges.

Only the adapter trains (AdamW, fp32 master weights; under bf16 autocast on CUDA); U-Net, VAE and text
encoder are frozen. Data handling, so the GPU is not starved: all pairs sit in host memory as uint8;
the source and target latents of every frame are encoded once up front and kept on the device (VAE
frozen and deterministic: 2 x 4 x (size/8)^2 values per frame; per batch with ``--augment``); text-encoder outputs are computed
for the frames a batch needs and cached on the host up to ``te_cache_gb``. Each batch holds one
prompt (the embeddings of one prompt share a length), sampled in proportion to its frame count.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import click
import numpy as np
import torch
import torch.nn.functional as F

from ..cli.options import load, model_options, resolve_device
from ..errors import StreameditError

log = logging.getLogger(__name__)


@dataclass
class PairSet:
    """Every pair of a pairs folder in host memory (uint8, (N,H,W,3)), grouped by prompt."""

    size: int
    prompts: list[str]
    groups: list[torch.Tensor]  # frame indices of each prompt
    source: torch.Tensor
    cond: torch.Tensor
    target: torch.Tensor | None  # dropped once encoded (kept for the pixel loss)
    teacher: torch.Tensor | None = None  # the base model's outputs (stale cond is made from them)
    start: torch.Tensor | None = None  # (N,) 1 = first frame of a shot
    clip: torch.Tensor | None = None  # (N,) index of the pair file each frame came from

    def __len__(self) -> int:
        return len(self.source)


def load_pairs(pairs_dir) -> PairSet:
    from .pairs import load_pair_file, read_manifest

    manifest = read_manifest(pairs_dir)
    parts = {k: [] for k in ("source", "cond", "target", "teacher")}
    starts, files = [], []
    prompts: list[str] = []
    owner: list[int] = []
    size = None
    for entry in manifest["files"]:
        arrays, meta = load_pair_file(Path(pairs_dir) / entry["file"])
        shape = arrays["source"].shape
        if any(arrays[k].shape != shape for k in parts) or len(shape) != 4 or shape[1] != shape[2]:
            raise StreameditError(f"pairs file {entry['file']!r}: source/cond/target shapes differ or are not square")
        if size is not None and shape[1] != size:
            raise StreameditError(f"pairs file {entry['file']!r} is {shape[1]}px but others are {size}px: "
                                  "make all pairs at one --size")
        size = shape[1]
        if meta["prompt"] not in prompts:
            prompts.append(meta["prompt"])
        owner += [prompts.index(meta["prompt"])] * shape[0]
        starts.append(torch.from_numpy(arrays["start"]))
        files += [len(starts) - 1] * shape[0]
        for k, chunks in parts.items():
            chunks.append(torch.from_numpy(arrays[k]))
    owner_t = torch.tensor(owner)
    groups = [torch.nonzero(owner_t == i).flatten() for i in range(len(prompts))]
    return PairSet(size, prompts, groups, *(torch.cat(parts[k]) for k in ("source", "cond", "target", "teacher")),
                   start=torch.cat(starts), clip=torch.tensor(files))


def sigma_schedule(models, size: int, sigmas) -> tuple[torch.Tensor, torch.Tensor]:
    """(shifted sigmas, timesteps) the model's scheduler makes from ``sigmas`` at ``size``, with the
    runtime's dynamic shift; ``Denoiser(models, n, size)`` uses ``sigmas = linspace(1, 1/n, n)``."""
    from ..diffusion.denoiser import sigma_schedule as schedule

    shifted, timesteps = schedule(models, size, sigmas)
    return shifted[:-1].float(), timesteps.float()


@torch.no_grad()
class _EmbedCache:
    """Text-encoder outputs per frame, on the host, up to a byte budget (the TE is frozen)."""

    def __init__(self, models, data: PairSet, budget_gb: float):
        from ..text.exact import TextEncoderRunner

        self.te, self.data, self.budget = TextEncoderRunner(models), data, int(budget_gb * 2**30)
        self.cache: dict[int, torch.Tensor] = {}
        self.bytes = 0

    def get(self, prompt: str, idx: list[int]) -> torch.Tensor:
        missing = sorted({i for i in idx if i not in self.cache})
        fresh: dict[int, torch.Tensor] = {}
        if missing:
            images = self.te.prepare_images([self.data.source[i].numpy() for i in missing])
            out = self.te.encode(prompt, images, len(missing))
            for i, e in zip(missing, out):
                fresh[i] = e
                if self.bytes + e.nbytes <= self.budget:
                    self.cache[i] = e.to("cpu", copy=True)  # not a view pinning the batch
                    self.bytes += e.nbytes
        device = self.te.models.device
        return torch.stack([fresh[i] if i in fresh else self.cache[i].to(device, non_blocking=True) for i in idx])


def _pixel_loss(denoiser, amp, noisy, s, pred, at_start, targets_u8) -> torch.Tensor:
    """Image loss of the operating-point examples' 1-step outputs (decoded as ``Denoiser.decode`` does).
    ``at_start`` is the batch's host-side mask, ``targets_u8`` its (n,H,W,3) target frames."""
    from ..diffusion.denoiser import vae_image
    from .common import image_loss, to_pm1

    keep = at_start.nonzero().flatten()
    x0 = (noisy - s * pred.float())[keep.to(noisy.device)]
    with amp():
        img = vae_image(denoiser.vae, x0, denoiser.scaling, denoiser.shift)
    target = to_pm1(targets_u8[keep.to(targets_u8.device)].to(x0.device, non_blocking=True))
    return image_loss(img.float(), target)


def _check(steps, batch_size, grad_accum, lr, p_one, save_every, pixel_weight=0.0):
    for name, value in (("--steps", steps), ("--batch", batch_size), ("--grad-accum", grad_accum)):
        if value < 1:
            raise StreameditError(f"{name} must be >= 1, got {value}")
    if lr <= 0:
        raise StreameditError(f"--lr must be > 0, got {lr}")
    if not 0.0 <= p_one <= 1.0:
        raise StreameditError(f"--p-one must be in [0, 1], got {p_one}")
    if save_every < 0:
        raise StreameditError(f"--save-every must be >= 0, got {save_every}")
    if pixel_weight < 0:
        raise StreameditError(f"--pixel-weight must be >= 0, got {pixel_weight}")


def _check_generalisation(stale_cond, runtime_batch, flow, zoom_min, rotate):
    from ..temporal.adapter import FLOW_CONVENTIONS

    if stale_cond < 0 or runtime_batch < 1:
        raise StreameditError(f"--stale-cond must be >= 0 and --runtime-batch >= 1, got {stale_cond}, {runtime_batch}")
    if flow not in FLOW_CONVENTIONS:
        raise StreameditError(f"--flow must be one of {', '.join(FLOW_CONVENTIONS)}, got {flow!r}")
    if flow != "backward" and not stale_cond:
        raise StreameditError("--flow forward needs --stale-cond: the stored pair conds were warped backward")
    if not 0.1 <= zoom_min <= 1.0 or not 0 <= rotate <= 45:
        raise StreameditError(f"--zoom-min must be in [0.1, 1] and --rotate in [0, 45], got {zoom_min}, {rotate}")


def _optimizer(params, lr, weight_decay, adamw8bit):
    if adamw8bit:
        try:
            import bitsandbytes as bnb
        except ImportError:
            raise StreameditError("--adamw8bit needs bitsandbytes (pip install bitsandbytes), "
                                  "or leave the flag off for torch's AdamW") from None
        return bnb.optim.AdamW8bit(params, lr=lr, weight_decay=weight_decay)
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)


def checkpoint_path(out_path, step: int) -> Path:
    out = Path(out_path)
    return out.with_name(f"{out.stem}-step{step:06d}{out.suffix or '.safetensors'}")


def train_lllite(models, pairs_dir, out_path, hooks="down", steps: int = 2000, batch_size: int = 8,
                 grad_accum: int = 1, lr: float = 1e-4, weight_decay: float = 1e-2, adamw8bit: bool = False,
                 bf16: bool = True, save_every: int = 0, cond_emb_dim: int = 32, mlp_dim: int = 64, seed: int = 0,
                 log_path=None, p_one: float = 0.5, max_grad_norm: float = 1.0, warmup: int = 0,
                 fixed_noise: bool = False, te_cache_gb: float = 8.0, pixel_weight: float = 0.0,
                 stale_cond: int = 0, runtime_batch: int = 4, flow: str = "backward", flow_size: int | None = None,
                 augment: bool = False, zoom_min: float = 0.6, rotate: float = 8.0, resume=None,
                 progress: bool = True) -> dict:
    """Train an adapter on the pairs in ``pairs_dir`` and save it to ``out_path``; returns a summary
    (``first_loss``, ``final_loss``, ``steps``, ``wall_s``, ...). ``fixed_noise`` trains on the runtime's
    ``--fixed-noise`` draw for ``seed`` instead of fresh noise per example; ``pixel_weight`` weighs the
    image loss of the operating-point examples (module docstring). ``stale_cond`` R > 0 trains on the cond
    images the runtime makes at refresh intervals 1..R (batch size ``runtime_batch``, flow convention ``flow``
    at ``flow_size``); ``augment`` transforms every pair (zoom to ``zoom_min``, rotation, flip):
    :mod:`streamedit.train.augment`. ``resume``: an adapter file this trainer wrote, to train on from its step
    with the same options (:mod:`streamedit.train.resume`)."""
    from tqdm import tqdm

    from ..diffusion.denoiser import Denoiser, start_sample
    from ..models.loading import default_strength
    from ..temporal.adapter import LLLiteAdapter, apply_lllite, remove_lllite
    from .augment import PairViews, StaleCond
    from .resume import check_options, read_state, restore, save_state

    _check(steps, batch_size, grad_accum, lr, p_one, save_every, pixel_weight)
    _check_generalisation(stale_cond, runtime_batch, flow, zoom_min, rotate)
    t_start = time.perf_counter()
    state = read_state(resume, steps) if resume else None  # a wrong file fails before the pairs load
    data = load_pairs(pairs_dir)
    size, device, unet = data.size, models.device, models.unet
    # what shapes the run (not --steps, --save-every, logging or caching): a resume must match it
    options = dict(model=type(unet).__name__, frames=len(data), prompts=data.prompts, size=data.size, hooks=hooks,
                   batch_size=batch_size, grad_accum=grad_accum, lr=lr, weight_decay=weight_decay, adamw8bit=adamw8bit,
                   bf16=bf16, cond_emb_dim=cond_emb_dim, mlp_dim=mlp_dim, seed=seed, p_one=p_one,
                   max_grad_norm=max_grad_norm, warmup=warmup, fixed_noise=fixed_noise, pixel_weight=pixel_weight,
                   stale_cond=stale_cond, runtime_batch=runtime_batch, flow=flow, flow_size=flow_size,
                   augment=augment, zoom_min=zoom_min, rotate=rotate)
    if state:
        check_options(state, options)
    step_px = models.vae_scale_factor * 4
    if size % step_px:
        raise StreameditError(f"pairs are {size}px, but this model needs a multiple of {step_px}")
    # Low-precision models need autocast (fp32 adapter weights meet bf16 activations); fp32 models get
    # bf16 autocast on CUDA unless --no-bf16.
    amp_dtype = models.dtype if models.dtype != torch.float32 else (torch.bfloat16 if bf16 and device.type == "cuda"
                                                                   else None)
    amp = (lambda: torch.autocast(device.type, dtype=amp_dtype)) if amp_dtype else contextlib.nullcontext

    strength = default_strength(models)  # the runtime's start for this model
    denoiser = Denoiser(models, 1, size, strength=strength)
    stale = StaleCond(data, stale_cond, runtime_batch, flow_size, flow) if stale_cond else None
    views = PairViews(denoiser, data, bool(pixel_weight), stale, augment, zoom_min, rotate)
    table_sigma, table_t = sigma_schedule(models, size, np.linspace(strength, strength / 1000, 1000))
    embeds = _EmbedCache(models, data, te_cache_gb)
    time_ids = denoiser.time_ids.expand(batch_size, -1)
    width = views.latent_shape[-1]

    # the pairs' stored conds use the backward convention; stale conds use `flow`: the file records it
    # the initial weights follow --seed too (a run can be repeated), without moving the global RNG
    rng_devices = [torch.cuda.current_device() if device.index is None else device.index] \
        if device.type == "cuda" else []
    with torch.random.fork_rng(devices=rng_devices):
        torch.manual_seed(seed)
        adapter = LLLiteAdapter.for_unet(unet, hooks=hooks, cond_emb_dim=cond_emb_dim, mlp_dim=mlp_dim, cond_size=size,
                                         vae_scale=models.vae_scale_factor, flow=flow).float()  # fp32 master weights
    params = list(adapter.parameters())
    optimizer = _optimizer(params, lr, weight_decay, adamw8bit)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warmup) if warmup else 1.0)

    gen = torch.Generator("cpu").manual_seed(seed)
    weights = torch.tensor([len(g) for g in data.groups], dtype=torch.float)
    noise_shape = (1, *views.latent_shape)
    fixed = torch.randn(noise_shape, generator=torch.Generator("cpu").manual_seed(seed), dtype=models.dtype) \
        if fixed_noise else None

    def micro_batch():
        g = int(torch.multinomial(weights, 1, generator=gen))
        group = data.groups[g]
        idx = group[torch.randint(len(group), (batch_size,), generator=gen)]
        pick = torch.randint(len(table_sigma), (batch_size,), generator=gen)
        pick[torch.rand(batch_size, generator=gen) < p_one] = 0  # index 0: the operating point
        noise = (fixed.float().expand(batch_size, -1, -1, -1) if fixed is not None
                 else torch.randn((batch_size, *noise_shape[1:]), generator=gen))
        return idx, g, noise.to(device), table_sigma[pick].to(device), table_t[pick], pick == 0

    done, losses = restore(state, resume, unet, adapter, optimizer, schedule, gen) if state else (0, [])
    checkpoints = []
    log_file = open(log_path, "a" if state else "w") if log_path else None  # noqa: SIM115 (closed in the finally)
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    apply_lllite(unet, adapter, inference_mode=False)  # outside the try: a U-Net patched by others stays so
    frozen = [(p, p.requires_grad) for m in (unet, models.vae, models.text_encoder) for p in m.parameters()]
    for p, _ in frozen:
        p.requires_grad_(False)  # restored in the finally below
    bar = tqdm(range(done + 1, steps + 1), desc="lllite", unit="step", dynamic_ncols=True, initial=done, total=steps,
               disable=None if progress else True)
    try:
        adapter.train()
        t_train = time.perf_counter()
        for step in bar:
            total = torch.zeros((), device=device)
            for _ in range(grad_accum):
                idx, g, noise, sigma, t, at_start = micro_batch()
                cond, src_b, z0, targets = views(idx, gen)
                prompt_embeds = embeds.get(data.prompts[g], idx.tolist())
                s = sigma.view(-1, 1, 1, 1)
                noisy = (1 - s) * z0 + s * noise
                if denoiser.start_sigma < 1:  # the runtime starts from the noised source latent
                    first = start_sample(noise, src_b, denoiser.start_sigma, denoiser.scaling, denoiser.shift)
                    noisy = torch.where(at_start.view(-1, 1, 1, 1).to(device), first.float(), noisy)
                with amp():
                    adapter.set_cond_image(cond)
                    pred = unet(torch.cat([noisy.to(models.dtype), src_b], dim=3),
                                timestep=t.to(device, models.dtype),
                                encoder_hidden_states=prompt_embeds, added_cond_kwargs={"time_ids": time_ids},
                                return_dict=False)[0][..., :width]
                loss = F.mse_loss(pred.float(), (noisy - z0) / s)  # = noise - z0 off the source start
                if pixel_weight and bool(at_start.any()):  # a host-side mask: no sync
                    loss = loss + pixel_weight * _pixel_loss(denoiser, amp, noisy, s, pred, at_start, targets)
                (loss / grad_accum).backward()
                total += loss.detach() / grad_accum
                for m in adapter.lllite.values():
                    m.live_cond = None  # drop the graph-connected embeddings with the graph
            grad_norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
            value = float(total)
            losses.append(value)
            bar.set_postfix(loss=f"{value:.4f}", refresh=False)
            if log_file is not None:
                log_file.write(json.dumps({"step": step, "loss": value, "grad_norm": float(grad_norm),
                                           "lr": schedule.get_last_lr()[0],
                                           "time_s": round(time.perf_counter() - t_train, 3)}) + "\n")
                log_file.flush()
            if save_every and step % save_every == 0 and step < steps:
                checkpoints.append(str(checkpoint_path(out_path, step)))
                adapter.save(checkpoints[-1])
                save_state(checkpoints[-1], step, options, optimizer, schedule, gen, losses)
        adapter.save(out_path)
        save_state(out_path, steps, options, optimizer, schedule, gen, losses)
    finally:
        bar.close()
        if stale is not None:
            stale.close()
        remove_lllite(unet)
        for p, flag in frozen:
            p.requires_grad_(flag)
        if log_file is not None:
            log_file.close()
    wall = time.perf_counter() - t_start
    tail = losses[-min(10, len(losses)):]
    return {"out": str(out_path), "steps": steps, "first_loss": losses[0], "final_loss": losses[-1],
            "mean_last10": sum(tail) / len(tail), "losses": losses, "wall_s": wall,
            "train_s": time.perf_counter() - t_train, "frames": len(data), "prompts": len(data.prompts),
            "params": sum(p.numel() for p in params), "checkpoints": checkpoints, "adapter": adapter.eval()}


@click.command("lllite")
@model_options
@click.option("--pairs", "pairs_dir", required=True, help="Folder made by `streamedit train pairs`.")
@click.option("-o", "--output", required=True, help="Adapter checkpoint to write (.safetensors).")
@click.option("--hooks", default="down", show_default=True, help="down | mid | up | all | name,name,...")
@click.option("--steps", default=2000, show_default=True, help="Optimizer steps.")
@click.option("--batch", default=8, show_default=True, help="Examples per micro-batch (one prompt each).")
@click.option("--grad-accum", default=1, show_default=True, help="Micro-batches per optimizer step.")
@click.option("--lr", default=1e-4, show_default=True)
@click.option("--weight-decay", default=1e-2, show_default=True)
@click.option("--adamw8bit", is_flag=True, help="bitsandbytes' 8-bit AdamW (must be installed).")
@click.option("--bf16/--no-bf16", default=True, show_default=True, help="bf16 autocast on CUDA.")
@click.option("--save-every", default=0, show_default=True, help="Also save OUTPUT-stepNNNNNN every N steps.")
@click.option("--cond-emb-dim", default=32, show_default=True)
@click.option("--mlp-dim", default=64, show_default=True)
@click.option("--seed", default=0, show_default=True)
@click.option("--log", "log_path", default=None, help="Write one JSON line per step (loss, grad norm, lr).")
@click.option("--p-one", default=0.5, show_default=True, help="Fraction of examples at sigma 1 (1-step point).")
@click.option("--max-grad-norm", default=1.0, show_default=True)
@click.option("--warmup", default=0, show_default=True, help="Linear LR warmup steps.")
@click.option("--fixed-noise", is_flag=True, help="Train on the runtime's --fixed-noise draw for --seed.")
@click.option("--te-cache-gb", default=8.0, show_default=True, help="Host memory for cached TE outputs.")
@click.option("--pixel-weight", default=0.0, show_default=True,
              help="Weight of a decoded-image loss (L1 + MSE + Sobel gradients) on the 1-step outputs; "
                   "charges the adapter for blur (0: the paper's latent loss only).")
@click.option("--stale-cond", default=0, show_default=True,
              help="Train on the cond the runtime uses at cond refresh 1..N (an older frame's warped output); "
                   "0: the stored fresh cond.")
@click.option("--runtime-batch", default=4, show_default=True, help="The runtime batch size --stale-cond mimics.")
@click.option("--flow", type=click.Choice(["backward", "forward"]), default="backward", show_default=True,
              help="Flow convention of the adapter (recorded in its file; forward needs --stale-cond).")
@click.option("--flow-size", type=int, default=None, help="Flow resolution for --stale-cond (the runtime's --flow-size).")
@click.option("--augment", is_flag=True, help="Random zoom/shift/rotation/flip of each pair (source, cond, target alike).")
@click.option("--zoom-min", default=0.6, show_default=True, help="--augment: smallest crop side (fraction of the frame).")
@click.option("--rotate", default=8.0, show_default=True, help="--augment: largest rotation (degrees).")
@click.option("--resume", default=None, type=click.Path(dir_okay=False),
              help="Train on from an adapter file this command wrote (a --save-every checkpoint or an output), "
                   "with the same options and a larger --steps.")
def lllite_command(model, revision, device, dtype, pairs_dir, output, hooks, steps, batch, grad_accum, lr,
                   weight_decay, adamw8bit, bf16, save_every, cond_emb_dim, mlp_dim, seed, log_path, p_one,
                   max_grad_norm, warmup, fixed_noise, te_cache_gb, pixel_weight, stale_cond, runtime_batch, flow,
                   flow_size, augment, zoom_min, rotate, resume):
    """Train a temporal LLLite adapter on teacher pairs (only the adapter learns)."""
    from .pairs import read_manifest

    read_manifest(pairs_dir)  # fail on a bad folder before any slow loading
    _check(steps, batch, grad_accum, lr, p_one, save_every, pixel_weight)
    _check_generalisation(stale_cond, runtime_batch, flow, zoom_min, rotate)
    if adamw8bit:
        _optimizer([torch.nn.Parameter(torch.zeros(1))], lr, weight_decay, True)  # missing package: fail now
    device, torch_dtype = resolve_device(device, dtype)
    models = load(model, revision, device, torch_dtype)
    summary = train_lllite(models, pairs_dir, output, hooks=hooks,
                           steps=steps, batch_size=batch, grad_accum=grad_accum, lr=lr, weight_decay=weight_decay,
                           adamw8bit=adamw8bit, bf16=bf16, save_every=save_every, cond_emb_dim=cond_emb_dim,
                           mlp_dim=mlp_dim, seed=seed, log_path=log_path, p_one=p_one, max_grad_norm=max_grad_norm,
                           warmup=warmup, fixed_noise=fixed_noise, te_cache_gb=te_cache_gb,
                           pixel_weight=pixel_weight, stale_cond=stale_cond, runtime_batch=runtime_batch, flow=flow,
                           flow_size=flow_size, augment=augment, zoom_min=zoom_min, rotate=rotate, resume=resume)
    click.echo(f"{summary['steps']} steps on {summary['frames']} pairs ({summary['params'] / 1e6:.2f} M adapter "
               f"params) in {summary['wall_s']:.1f} s: loss {summary['first_loss']:.4f} -> "
               f"{summary['mean_last10']:.4f} (mean of last 10) -> {summary['out']}")
