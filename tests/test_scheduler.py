"""denoise.py's written-out Euler step against FlowMatchEulerDiscreteScheduler.step, and the configs it refuses."""

import copy
import dataclasses
import importlib.util

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.pipelines.dreamlite.pipeline_dreamlite_mobile import calculate_shift, retrieve_timesteps

from streamedit import EngineConfig, StreameditError, StreamEngine
from streamedit.diffusion.denoiser import Denoiser
from streamedit.models.loading import check_scheduler

SIZE = 64
ACCEPTED = {
    "published": {},  # dynamic shift, exponential time shift (DreamLite-mobile's scheduler)
    "static shift": dict(use_dynamic_shifting=False),
    "linear time shift": dict(time_shift_type="linear"),
    "karras": dict(use_karras_sigmas=True),
    "exponential sigmas": dict(use_exponential_sigmas=True),
    "beta sigmas": dict(use_beta_sigmas=True),
    "shift_terminal": dict(shift_terminal=0.1),
}
REFUSED = {"stochastic": dict(stochastic_sampling=True), "inverted": dict(invert_sigmas=True)}


def _with_scheduler(models, **overrides):
    cfg = {k: v for k, v in models.scheduler.config.items() if not k.startswith("_")}
    return dataclasses.replace(models, scheduler=FlowMatchEulerDiscreteScheduler(**{**cfg, **overrides}))


class _Velocity(torch.nn.Module):
    """A U-Net stand-in: a fixed random prediction per call (both halves of the width), recording timesteps."""

    def __init__(self, shape, steps):
        super().__init__()
        g = torch.Generator().manual_seed(7)
        self.preds = [torch.randn(shape, generator=g) for _ in range(steps)]
        self.timesteps = []

    def forward(self, sample, timestep, **kwargs):
        self.timesteps.append(timestep[0].clone())
        return (torch.cat([self.preds[len(self.timesteps) - 1]] * 2, dim=3),)


@pytest.mark.parametrize("steps", [1, 2, 3, 4])
@pytest.mark.parametrize("name", list(ACCEPTED))
def test_euler_step_equals_scheduler_step(tiny_models, name, steps):
    if name == "beta sigmas" and importlib.util.find_spec("scipy") is None:
        pytest.skip("beta sigmas need scipy")
    if name == "shift_terminal" and steps == 1:
        pytest.skip("one step with shift_terminal is a non-finite schedule (refused, see below)")
    models = _with_scheduler(tiny_models, **ACCEPTED[name])
    check_scheduler(models.scheduler)
    latent = SIZE // models.vae_scale_factor
    shape = (1, models.vae.config.latent_channels, latent, latent)
    unet = _Velocity(shape, steps)
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(3))
    ours = Denoiser(models, steps, SIZE, unet=unet).denoise(noise, torch.zeros(shape), torch.zeros(1, 4, 64))
    # the reference: upstream's schedule (retrieve_timesteps with its dynamic shift mu) and scheduler.step
    scheduler, cfg = copy.deepcopy(models.scheduler), models.scheduler.config
    mu = calculate_shift(latent * latent // 4, cfg.base_image_seq_len, cfg.max_image_seq_len, cfg.base_shift,
                         cfg.max_shift)
    timesteps, _ = retrieve_timesteps(scheduler, steps, "cpu", sigmas=np.linspace(1.0, 1 / steps, steps), mu=mu)
    x = noise
    for t, v in zip(timesteps, unet.preds):
        x = scheduler.step(v, t, x, return_dict=False)[0]
    assert torch.equal(torch.stack(unet.timesteps), timesteps.float())
    assert torch.equal(ours, x)
    if steps > 1:  # the step can fail: the scheduler's stochastic variant moves the result
        noisy = copy.deepcopy(models.scheduler)
        noisy.register_to_config(stochastic_sampling=True)
        retrieve_timesteps(noisy, steps, "cpu", sigmas=np.linspace(1.0, 1 / steps, steps), mu=mu)
        y = noise
        for t, v in zip(noisy.timesteps, unet.preds):
            y = noisy.step(v, t, y, return_dict=False, generator=torch.Generator().manual_seed(0))[0]
        assert (y - x).abs().max() > 1e-2


@pytest.mark.parametrize("name", list(REFUSED))
def test_refused_scheduler_configs(tiny_models, name):
    models = _with_scheduler(tiny_models, **REFUSED[name])
    key = next(iter(REFUSED[name]))
    with pytest.raises(StreameditError, match=key):
        StreamEngine(models, EngineConfig(prompt="oil painting", size=SIZE))


def test_refused_scheduler_class_and_non_finite_schedule(tiny_models):
    from diffusers import FlowMatchHeunDiscreteScheduler

    heun = dataclasses.replace(tiny_models, scheduler=FlowMatchHeunDiscreteScheduler())
    with pytest.raises(StreameditError, match="FlowMatchHeunDiscreteScheduler"):
        StreamEngine(heun, EngineConfig(prompt="oil painting", size=SIZE))
    terminal = _with_scheduler(tiny_models, shift_terminal=0.1)
    with pytest.raises(StreameditError, match="non-finite"):
        StreamEngine(terminal, EngineConfig(prompt="oil painting", size=SIZE, steps=1))
    StreamEngine(terminal, EngineConfig(prompt="oil painting", size=SIZE, steps=2)).close()
