"""Edit-mode denoising and the VAE around it, with upstream DreamLiteMobilePipeline's arithmetic.

Per step: ``unet(cat([latents, source_latents], dim=width), t, prompt_embeds, time_ids)``, keep
the left (noisy) half of the prediction, and take a FlowMatch Euler step ``x + (s_next - s) * v``
in float32 (the scheduler's own ``step`` upcasts the sample, not the prediction). The sigmas come
from the model's own scheduler (``linspace(1, 1/steps, steps)`` with dynamic shift ``mu``), so the
schedule is the same as upstream; the step itself is written out because the scheduler's
``step`` keeps a Python step counter, which would break CUDA-graph replay.

``strength < 1`` (SDEdit-style start, our extension; upstream is ``strength = 1``): the schedule is
``linspace(strength, strength/steps, steps)`` through the same shift, and the first sample is the
source latent noised to the first sigma, :func:`start_sample`, instead of pure noise.

Compiling it (U-Net + decode as one function, the VAE encode, their CUDA graphs, the warm start) is
:mod:`streamedit.accel.compile_main`: it compiles :meth:`Denoiser.generate` (which returns the final latents
beside the frames) and the VAE targets below and installs them in the slots the engine calls (``fused``,
``decode_fn``, ``encode_fn``); here they stay eager.
"""

from __future__ import annotations

import copy

import numpy as np
import torch
from diffusers.pipelines.dreamlite.pipeline_dreamlite_mobile import calculate_shift


def hw(size) -> tuple[int, int]:
    """A working size as (height, width): an int is a square."""
    return (int(size), int(size)) if isinstance(size, (int, np.integer)) else (int(size[0]), int(size[1]))


def sigma_schedule(models, size, sigmas, device="cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """(shifted sigmas with the terminal 0, timesteps) that the model's own scheduler makes from ``sigmas``
    at working size ``size`` (side or (h, w)), with upstream's resolution-dependent shift ``mu`` (from the
    image sequence length, latent h * w / 4)."""
    scheduler = copy.deepcopy(models.scheduler)  # set_timesteps mutates it
    cfg = scheduler.config
    h, w = (v // models.vae_scale_factor for v in hw(size))
    mu = calculate_shift(h * w // 4, cfg.get("base_image_seq_len", 256), cfg.get("max_image_seq_len", 4096),
                         cfg.get("base_shift", 0.5), cfg.get("max_shift", 1.16))
    scheduler.set_timesteps(sigmas=np.asarray(sigmas, dtype=np.float64), device=device, mu=mu)
    return scheduler.sigmas, scheduler.timesteps


def start_sample(noise: torch.Tensor, source_latents: torch.Tensor, sigma: float, scaling: float,
                 shift: float = 0.0) -> torch.Tensor:
    """The first sample at start sigma ``sigma``: pure noise at 1, else the flow-matching interpolation
    of the (model-space) source latent and the noise, ``(1 - sigma) * z_source + sigma * noise``."""
    if sigma >= 1.0:
        return noise
    clean = (source_latents.float() - shift) * scaling
    return ((1.0 - sigma) * clean + sigma * noise.float()).to(noise.dtype)


def vae_image(vae, latents: torch.Tensor, scaling: float, shift: float = 0.0) -> torch.Tensor:
    """Model-space latents -> the VAE's image in [-1, 1], differentiable: what :meth:`Denoiser.decode`
    rounds to 8 bits and what the training losses compare with their targets."""
    return vae.decode(latents / scaling + shift, return_dict=False)[0]


class Denoiser:
    def __init__(self, models, steps: int, size, unet=None, vae=None, strength: float = 1.0):
        """``size``: the working size, a side (square) or (height, width)."""
        self.models = models
        self.unet = unet if unet is not None else models.unet
        self.vae = vae if vae is not None else models.vae
        # what the engine calls; accel.compile_main.compile_denoiser puts compiled functions here
        self.fused = None  # compiled generate(): the engine calls it instead of denoise + decode
        self.decode_fn = None  # compiled decode (VAE compiled, U-Net not); None: decode()
        self.encode_fn = self.encode_source  # what encode() runs
        self.steps = steps
        self.shape = height, width = hw(size)
        self.latent_shape = (height // models.vae_scale_factor, width // models.vae_scale_factor)
        device, dtype = models.device, models.dtype
        self.strength = strength
        sigmas, timesteps = sigma_schedule(models, size, np.linspace(strength, strength / steps, steps), device)
        self.start_sigma = float(sigmas[0])
        self.timesteps = timesteps.to(dtype)  # upstream feeds t.to(latents.dtype)
        # 0-dim float32 step sizes: dt * v then promotes like scheduler.step does.
        self.dts = [sigmas[i + 1] - sigmas[i] for i in range(steps)]
        self.time_ids = torch.tensor([[width, height]], device=device, dtype=dtype)  # upstream: (W, H)
        vae = self.vae.config
        self.scaling, self.shift = vae.scaling_factor, getattr(vae, "shift_factor", 0.0) or 0.0

    @torch.no_grad()
    def encode_source(self, frames_u8: torch.Tensor) -> torch.Tensor:
        """(B,H,W,3) uint8 on device -> source latents, as upstream's VaeImageProcessor + vae.encode."""
        x = frames_u8.permute(0, 3, 1, 2).float() / 255.0
        x = (2.0 * x - 1.0).to(self.models.dtype)
        return self.vae.encode(x).latents

    @torch.no_grad()
    def denoise(self, noise: torch.Tensor, source_latents: torch.Tensor, embeds: torch.Tensor,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        """``mask``: (B, tokens) 1/0 over ``embeds`` (te_size 256: the padded sequence), the U-Net's
        ``encoder_attention_mask``; None: every token counts."""
        batch, width = noise.shape[0], noise.shape[-1]
        latents = start_sample(noise, source_latents, self.start_sigma, self.scaling, self.shift)
        time_ids = self.time_ids.expand(batch, -1)
        for i in range(self.steps):
            pred = self.unet(
                torch.cat([latents, source_latents], dim=3),
                timestep=self.timesteps[i].expand(batch),
                encoder_hidden_states=embeds,
                encoder_attention_mask=mask,
                added_cond_kwargs={"time_ids": time_ids},
                return_dict=False,
            )[0][..., :width]
            latents = (latents.float() + self.dts[i] * pred).to(pred.dtype)
        return latents

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents -> (B,H,W,3) uint8 on device (upstream's postprocess, then rounding to 8 bits)."""
        images = (vae_image(self.vae, latents, self.scaling, self.shift) / 2 + 0.5).clamp(0, 1)
        return (images * 255).round().to(torch.uint8).permute(0, 2, 3, 1)

    # The compile targets (accel.compile_main) hold their own no_grad block instead of the decorator: a
    # decorated method's compiled code object would be the shared decorator wrapper's.
    def generate(self, noise: torch.Tensor, source_latents: torch.Tensor, embeds: torch.Tensor,
                 mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """denoise + decode -> (contiguous (B,H,W,3) uint8, the final latents): the function compiled as one
        graph. The latents are an output too (B x 4 x h/8 x w/8, written once), so what the U-Net produced
        stays visible (engine probe, bench agreement) at no measurable cost."""
        with torch.no_grad():
            latents = self.denoise(noise, source_latents, embeds, mask)
            return self.decode(latents).contiguous(), latents

    def _decode_target(self, latents: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.decode(latents).contiguous()

    def _encode_target(self, frames_u8: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.encode_source(frames_u8)

    def encode(self, frames_u8: torch.Tensor) -> torch.Tensor:
        """:meth:`encode_source`, or its compiled/graphed form (accel.compile_main); safe to keep (a copy)."""
        return self.encode_fn(frames_u8)
