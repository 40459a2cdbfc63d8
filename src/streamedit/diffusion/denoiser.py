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

:meth:`Denoiser.compile` (engine ``compile``/``compile_vae``): the main stream's whole work for a
batch, U-Net x steps + VAE decode + uint8 conversion, becomes ONE compiled function
(:meth:`Denoiser.generate`, which returns the final latents beside the frames), and so does the side stream's VAE encode (uint8 -> [-1, 1] -> encoder).
With a CUDA-graph mode (``reduce-overhead``) both are compiled without cudagraph trees and each is
captured by :class:`streamedit.accel.graphs.StaticGraph` into one CUDA graph that replays on the stream
that calls it (on the H100 the main stream's graph took 55 ms beside the TE, against 58 ms as a
cudagraph tree; docs/benchmarks.md). With a cache key both are saved whole
(:class:`streamedit.accel.compile_cache.Precompiled`) and the next process loads them untraced. The VAE
runs as a channels_last copy (shared per model, so the eager path and other engines keep the
original): TAESD is all convolutions, and the decoder's NHWC output is the uint8 frame layout.
The LLLite adapter's cond buffers are module buffers updated in place, so the compiled U-Net
reads their current contents at every call.
"""

from __future__ import annotations

import copy
from concurrent.futures import Future, ThreadPoolExecutor

import numpy as np
import torch
from diffusers.pipelines.dreamlite.pipeline_dreamlite_mobile import calculate_shift

from ..accel.compile_cache import Precompiled, compiled
from ..accel.graphs import CONV_NET_INDUCTOR, StaticGraph, compile_fn, inductor_mode, wants_graph
from ..accel.kernels import fuse_tiny_vae


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
        self.fused = None  # compiled generate(): the engine calls it instead of denoise + decode
        self.warmed_on_worker = False  # warm_main started the first call on a worker thread
        self.decode_fn = None  # compiled decode (VAE compiled, U-Net not); None: decode()
        self._encode_fn = self.encode_source
        self._encode_graph = None
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

    # The two compile targets hold their own no_grad block instead of the decorator: a decorated
    # method's compiled code object would be the shared decorator wrapper's.
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
        """:meth:`encode_source`, compiled/graphed after :meth:`compile`; safe to keep (a copy)."""
        if self._encode_graph is not None:
            return self._encode_graph(frames_u8).clone()  # the next replay overwrites the graph output
        return self._encode_fn(frames_u8)

    def compile(self, mode: str | None, backend: str = "inductor", unet: bool = True, vae: bool = True,
                channels_last: bool = True, cache_key: str | None = None) -> "Denoiser":
        """Compile the U-Net and/or the VAE (see the module docstring). Both: one fused function.

        With both and a CUDA-graph mode, the fused function is compiled without cudagraph trees and
        captured by :class:`StaticGraph`, like the VAE encode: ``cache_key`` then saves both whole
        (:class:`compile_cache.Precompiled`), so the next process loads them without tracing.
        """
        if vae and channels_last:
            self.vae = channels_last_vae(self.models)
        graph = wants_graph(mode, self.models.device)
        static_mode = inductor_mode(mode) if graph else mode  # for what StaticGraph captures
        if unet and vae:
            fused = compiled(self.generate, static_mode, backend, cache_key, "main", inductor=CONV_NET_INDUCTOR)
            self.fused = StaticGraph(fused, self.models.device, name="main") if graph else fused
        elif unet:  # the paper's recipe: the U-Net alone, in cudagraph trees
            for t in (self.timesteps, self.time_ids, *self.dts):  # constant inputs: no copy into the trees
                torch._dynamo.mark_static_address(t)
            self.unet = compile_fn(self.unet, mode, backend)
        elif vae:
            self.decode_fn = compile_fn(self._decode_target, mode, backend)
        if vae:
            self._encode_fn = compiled(self._encode_target, static_mode, backend, cache_key, "encode",
                                       inductor=CONV_NET_INDUCTOR)
            if graph:
                self._encode_graph = StaticGraph(self._encode_fn, self.models.device, name="encode")
        return self

    def with_own_graphs(self) -> "Denoiser":
        """A copy sharing the compiled functions, with CUDA graphs of its own: the multi-stream engine keeps
        one per batch-size bucket, so alternating batch sizes replay their graphs instead of re-capturing
        (a :class:`StaticGraph` captures again whenever its input shapes change)."""
        twin = copy.copy(self)
        if isinstance(self.fused, StaticGraph):
            twin.fused = StaticGraph(self.fused.fn, self.fused.device, name=self.fused.name)
        if self._encode_graph is not None:
            twin._encode_graph = StaticGraph(self._encode_fn, self._encode_graph.device, name="encode")
        return twin

    def release(self) -> None:
        """Drop the CUDA graphs of the main and encode functions (and their static buffers); the compiled
        functions stay, a later call captures again. The caller makes sure no replay is still queued."""
        for graph in (self.fused, self._encode_graph):
            if isinstance(graph, StaticGraph):
                graph.release()

    def warm_main(self, batch: int, embeds_shape: tuple[int, int], masked: bool = False) -> Future | None:
        """Get the main function ready for a first batch of ``batch`` frames while the caller goes on.

        For a warm start (engine, first batch): the saved function is loaded here, on the caller's
        thread (Python holding the GIL), and its first call and CUDA-graph capture run on a worker
        thread, which the caller joins (``.result()``) before the first batch's own call. That first
        call is cuDNN/cuBLAS set-up with the GIL released (4.0 s of a 29 s warm start on the H100,
        docs/benchmarks.md), so it overlaps what the caller loads next (the TE). None when there is
        nothing saved to load: a compile runs in the usual order, on one thread.
        """
        # a graph's inputs are its own contiguous buffers: the signature known here is the one it will
        # call with (a bare function would see the callers' strides: channels_last latents, expanded embeds)
        if not (isinstance(self.fused, StaticGraph) and isinstance(self.fused.fn, Precompiled)):
            return None
        fn = self.fused.fn
        device, dtype = self.models.device, self.models.dtype
        latents = (batch, self.models.vae.config.latent_channels, *self.latent_shape)
        inputs = (torch.zeros(latents, dtype=dtype, device=device), torch.zeros(latents, dtype=dtype, device=device),
                  torch.zeros((batch, *embeds_shape), dtype=dtype, device=device))
        if masked:  # te_size 256: the text mask is the fourth input (long, like the TE's attention mask)
            inputs += (torch.ones((batch, embeds_shape[0]), dtype=torch.long, device=device),)
        if fn.prepare(*inputs) != "loaded":
            return None
        stream = None
        if device.type == "cuda":
            stream = torch.cuda.Stream(device)
            stream.wait_stream(torch.cuda.current_stream(device))  # the zeros
        self.warmed_on_worker = True
        worker = ThreadPoolExecutor(1, thread_name_prefix="streamedit-warm")
        modes = (torch.is_grad_enabled(), torch.is_inference_mode_enabled())  # thread-local, and guarded
        future = worker.submit(_first_call, self.fused, inputs, stream, modes)
        worker.shutdown(wait=False)
        return future


def _first_call(fn, inputs, stream, modes) -> None:
    """``fn(*inputs)`` once on ``stream`` (a StaticGraph: its warm-up and capture), finished on return."""
    grad, inference = modes
    with torch.set_grad_enabled(grad), torch.inference_mode(inference):
        if stream is None:
            fn(*inputs)
            return
        with torch.cuda.stream(stream):
            fn(*inputs)
        stream.synchronize()


def channels_last_vae(models):
    """A channels_last copy of the VAE, made once per model (TAESD: a few MB of weights).

    On CUDA its residual blocks run as cuDNN fused convolutions (:func:`streamedit.accel.kernels.fuse_tiny_vae`;
    the same sums, one pass over memory fewer each).
    """
    key = ("vae_channels_last", id(models.vae))
    if key not in models.extras:
        vae = copy.deepcopy(models.vae).to(memory_format=torch.channels_last)
        models.extras[key] = fuse_tiny_vae(vae) if models.device.type == "cuda" else vae
    return models.extras[key]
