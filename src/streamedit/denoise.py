"""Edit-mode denoising and the VAE around it, with upstream DreamLiteMobilePipeline's arithmetic.

Per step: ``unet(cat([latents, source_latents], dim=width), t, prompt_embeds, time_ids)``, keep
the left (noisy) half of the prediction, and take a FlowMatch Euler step ``x + (s_next - s) * v``
in float32 (the scheduler's own ``step`` upcasts the sample, not the prediction). The sigmas come
from the model's own scheduler (``linspace(1, 1/steps, steps)`` with dynamic shift ``mu``), so the
schedule is the same as upstream; the step itself is written out because the scheduler's
``step`` keeps a Python step counter, which would break CUDA-graph replay.
"""

from __future__ import annotations

import copy

import numpy as np
import torch
from diffusers.pipelines.dreamlite.pipeline_dreamlite_mobile import calculate_shift


class Denoiser:
    def __init__(self, models, steps: int, size: int, unet=None):
        self.models = models
        self.unet = unet if unet is not None else models.unet
        self.steps = steps
        self.size = size
        self.latent_size = size // models.vae_scale_factor
        device, dtype = models.device, models.dtype
        scheduler = copy.deepcopy(models.scheduler)  # set_timesteps mutates it
        cfg = scheduler.config
        mu = calculate_shift(self.latent_size * self.latent_size // 4, cfg.get("base_image_seq_len", 256),
                             cfg.get("max_image_seq_len", 4096), cfg.get("base_shift", 0.5), cfg.get("max_shift", 1.16))
        sigmas = np.linspace(1.0, 1 / steps, steps)
        scheduler.set_timesteps(sigmas=sigmas, device=device, mu=mu)
        self.timesteps = scheduler.timesteps.to(dtype)  # upstream feeds t.to(latents.dtype)
        # 0-dim float32 step sizes: dt * v then promotes like scheduler.step does.
        self.dts = [scheduler.sigmas[i + 1] - scheduler.sigmas[i] for i in range(steps)]
        self.time_ids = torch.tensor([[size, size]], device=device, dtype=dtype)
        vae = models.vae.config
        self.scaling, self.shift = vae.scaling_factor, getattr(vae, "shift_factor", 0.0) or 0.0

    @torch.no_grad()
    def encode_source(self, frames_u8: torch.Tensor) -> torch.Tensor:
        """(B,H,W,3) uint8 on device -> source latents, as upstream's VaeImageProcessor + vae.encode."""
        x = frames_u8.permute(0, 3, 1, 2).float() / 255.0
        x = (2.0 * x - 1.0).to(self.models.dtype)
        return self.models.vae.encode(x).latents

    @torch.no_grad()
    def denoise(self, noise: torch.Tensor, source_latents: torch.Tensor, embeds: torch.Tensor) -> torch.Tensor:
        batch, width = noise.shape[0], noise.shape[-1]
        latents = noise
        time_ids = self.time_ids.expand(batch, -1)
        for i in range(self.steps):
            pred = self.unet(
                torch.cat([latents, source_latents], dim=3),
                timestep=self.timesteps[i].expand(batch),
                encoder_hidden_states=embeds,
                added_cond_kwargs={"time_ids": time_ids},
                return_dict=False,
            )[0][..., :width]
            latents = (latents.float() + self.dts[i] * pred).to(pred.dtype)
        return latents

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents -> (B,H,W,3) uint8 on device (upstream's postprocess, then rounding to 8 bits)."""
        images = self.models.vae.decode(latents / self.scaling + self.shift, return_dict=False)[0]
        images = (images / 2 + 0.5).clamp(0, 1)
        return (images * 255).round().to(torch.uint8).permute(0, 2, 3, 1)
