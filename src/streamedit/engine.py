"""The streaming engine: frames -> batch -> side stream (TE + VAE encode) -> main stream
(denoise + decode) -> frames out.

Schedule for batch k (CUDA, ``pipeline=True``)::

    prefetch thread : [prepare k+2]  (PIL resize for the TE, image processor, pinned host tensors)
    side stream     : [TE k+1][VAE enc k+1] --event--+
    main stream     : [U-Net k][VAE dec k] ----------+--> [U-Net k+1][VAE dec k+1] ...
    host            : launch main k, launch side k+1, wait for main k, hand out frames of k

The only join between the streams is one CUDA event per batch; tensors made on the side stream
and read on the main stream are ``record_stream``-ed so the caching allocator cannot reuse them
early. On CPU (or ``pipeline=False``) the same steps run in order on one stream.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Iterable, Iterator

import cv2
import numpy as np
import torch

from .denoise import Denoiser
from .errors import StreameditError
from .text_encoder import MAX_PROMPT_CHARS, TextEncoderRunner

log = logging.getLogger(__name__)


@dataclass
class EngineConfig:
    prompt: str
    batch_size: int = 8
    steps: int = 1  # distilled operating point; 1-4
    size: int = 512
    seed: int = 0
    fixed_noise: bool = False  # every frame starts from the same noise (upstream's draw for `seed`)
    te_batch_one: bool = False  # approximation: encode one frame per batch, broadcast
    te_refresh_every: int = 1  # approximation: reuse the TE output for N batches
    te_fast: bool = False  # static, sync-free TE (te_fast.py); compiled (+CUDA graph) with `compile`
    pipeline: bool = True  # overlap TE/VAE-encode of batch k+1 with denoise/decode of batch k
    compile: bool = False
    compile_mode: str = "reduce-overhead"
    profile: bool = False  # per-component CUDA-event timings in `engine.batch_log`
    prefetch: int = 2  # batches prepared ahead on the host
    log_limit: int = 4096  # batch_log keeps the newest entries only (live sessions run for hours)
    # temporal LLLite adapter (see temporal.py): an LLLiteAdapter, a checkpoint path, or "random"
    lllite: object = None
    hooks: str | list = "down"
    lllite_multiplier: float = 1.0
    cond_refresh_every: int = 8  # rebuild the cond embedding every N batches, reuse it in between
    cut_refresh: bool = True  # a scene cut forces a cond (and TE) refresh on its batch
    motion_refresh: float | None = None  # refresh early when mean flow (px) since the last refresh exceeds this
    flow_size: int | None = None  # compute Farnebäck at this resolution (None: working size)


@dataclass
class _Batch:
    index: int
    frames: list  # HxWx3 uint8, padded to batch_size
    count: int  # real frames (the rest is padding)
    host_frames: torch.Tensor  # (B,H,W,3) uint8, pinned on CUDA
    images: dict  # processor outputs for the TE
    plan: object = None  # temporal.CondPlan
    entry: dict = field(default_factory=dict)  # this batch's line in batch_log
    keep: list = field(default_factory=list)  # host tensors that must outlive async copies


class StreamEngine:
    def __init__(self, models, config: EngineConfig):
        _validate(models, config)
        self.models, self.config = models, config
        self.device = models.device
        self.cuda = self.device.type == "cuda"
        if config.te_fast:
            from .te_fast import FastTextEncoderRunner

            self.te = FastTextEncoderRunner(models, config.batch_size)
            if config.compile:
                self.te.compile(config.compile_mode)
        else:
            self.te = TextEncoderRunner(models)
        self.adapter = _attach_adapter(models, config)
        self.temporal = None
        if self.adapter is not None or (config.cut_refresh and config.te_refresh_every > 1):
            from .temporal import TemporalConditioner

            self.temporal = TemporalConditioner(self.adapter, config.cond_refresh_every, config.cut_refresh,
                                                config.motion_refresh, config.flow_size)
        unet = torch.compile(models.unet, mode=config.compile_mode) if config.compile else models.unet
        self.denoiser = Denoiser(models, config.steps, config.size, unet=unet)
        self.main_stream = torch.cuda.current_stream(self.device) if self.cuda else None
        self.side_stream = torch.cuda.Stream(self.device) if self.cuda and config.pipeline else self.main_stream
        self.batch_log: list[dict] = []
        self.stats = {"batches": 0, "frames": 0, "te_calls": 0, "te_frames": 0}
        self._prompt = clean_prompt(config.prompt)
        self._te_prompt = None  # prompt of the cached TE output
        self._te_cache = None
        self._te_age = 0
        self._noise_gen = torch.Generator("cpu").manual_seed(config.seed)
        self._fixed_noise = None
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="streamedit-prefetch")

    # ---- public API -------------------------------------------------------------------------
    def set_prompt(self, prompt: str) -> None:
        """Change the instruction; the next batch whose encoding has not started uses it."""
        self._prompt = clean_prompt(prompt)

    @property
    def prompt(self) -> str:
        return self._prompt

    def run(self, frames: Iterable[np.ndarray]) -> Iterator[np.ndarray]:
        """Stylize a stream of HxWx3 uint8 RGB frames; yields the same number, in order."""
        batches = self._prefetched(self._batches(frames))
        if not self.config.pipeline:
            for batch in batches:
                yield from self._finish(self._generate(self._encode(batch)))
            return
        current = next(batches, None)
        if current is None:
            return
        encoded = self._encode(current)
        for upcoming in itertools.chain(batches, [None]):
            generated = self._generate(encoded)  # main stream: batch k
            encoded = self._encode(upcoming) if upcoming is not None else None  # side stream: k+1
            yield from self._finish(generated)

    def process(self, frames: list[np.ndarray]) -> list[np.ndarray]:
        """Synchronous form of :meth:`run` for callers that hold a batch already (live serving)."""
        return list(self.run(frames))

    # ---- host side ------------------------------------------------------------------------
    def _batches(self, frames: Iterable[np.ndarray]) -> Iterator[tuple[int, list, int]]:
        size, bsz = self.config.size, self.config.batch_size
        chunk: list[np.ndarray] = []
        index = 0
        for frame in frames:
            chunk.append(_to_working(frame, size))
            if len(chunk) == bsz:
                yield index, chunk, bsz
                index, chunk = index + 1, []
        if chunk:  # file mode never drops frames: pad with the last one, discard its outputs later
            count = len(chunk)
            yield index, chunk + [chunk[-1]] * (bsz - count), count

    def _prepare(self, item) -> _Batch:
        index, frames, count = item
        host = torch.from_numpy(np.stack(frames))
        images = self.te.prepare_images(frames[:1] if self.config.te_batch_one else frames)
        if self.cuda:
            host = host.pin_memory()
            if isinstance(images, dict):  # the fast TE returns one uint8 tensor, pinned already
                images = {k: v.pin_memory() for k, v in images.items()}
        plan = self.temporal.plan(frames, count) if self.temporal is not None else None
        return _Batch(index, frames, count, host, images, plan)

    def _prefetched(self, items: Iterator) -> Iterator[_Batch]:
        """Prepare up to `prefetch` batches ahead in a worker thread (PIL and numpy release the GIL)."""
        pending = []
        for item in items:
            pending.append(self._pool.submit(self._prepare, item))
            if len(pending) > self.config.prefetch:
                yield pending.pop(0).result()
        for fut in pending:
            yield fut.result()

    def _noise(self, batch: int) -> torch.Tensor:
        shape = (1, self.models.vae.config.latent_channels, self.denoiser.latent_size, self.denoiser.latent_size)
        dtype = self.models.dtype
        if self.config.fixed_noise:
            if self._fixed_noise is None:  # what upstream draws for generator=Generator("cpu").manual_seed(seed)
                self._fixed_noise = torch.randn(shape, generator=torch.Generator("cpu").manual_seed(self.config.seed),
                                                dtype=dtype)
            return self._fixed_noise.expand(batch, -1, -1, -1)
        # one draw per frame, so the noise of frame i does not depend on the batch size
        return torch.cat([torch.randn(shape, generator=self._noise_gen, dtype=dtype) for _ in range(batch)])

    # ---- device side --------------------------------------------------------------------------
    def _stream(self, stream):
        return torch.cuda.stream(stream) if self.cuda else contextlib.nullcontext()

    def _event(self, stream=None):
        if not (self.cuda and self.config.profile):
            return None
        ev = torch.cuda.Event(enable_timing=True)
        ev.record(stream)
        return ev

    def _encode(self, batch: _Batch) -> _Batch:
        """Side stream: TE (unless its output is reused) and VAE encode of the source frames."""
        cfg, bsz = self.config, self.config.batch_size
        prompt = self._prompt
        forced = batch.plan is not None and batch.plan.force_te
        reuse = (self._te_cache is not None and prompt == self._te_prompt and self._te_age < cfg.te_refresh_every
                 and not forced)
        noise = self._noise(bsz)
        entry = {"batch": batch.index, "frames": batch.count, "prompt": prompt, "te": "reused" if reuse else "computed",
                 "t_launch": time.perf_counter()}
        if batch.plan is not None:
            entry["cond"] = batch.plan.reason if batch.plan.refresh else "reuse"
            entry["cut_at"] = batch.plan.cut_at
        with self._stream(self.side_stream):
            ev = {"te0": self._event(self.side_stream)}
            if not reuse:
                te_batch = 1 if cfg.te_batch_one else bsz
                self._te_cache = self.te.encode(prompt, batch.images, te_batch)
                self._te_prompt, self._te_age = prompt, 0
                self.stats["te_calls"] += 1
                self.stats["te_frames"] += te_batch
            self._te_age += 1
            embeds = self._te_cache.expand(bsz, -1, -1)
            ev["te1"] = self._event(self.side_stream)
            frames = batch.host_frames.to(self.device, non_blocking=True)
            source = self.denoiser.encode_source(frames)
            noise = noise.to(self.device, non_blocking=True)
            ev["enc1"] = self._event(self.side_stream)
            done = torch.cuda.Event() if self.cuda and cfg.pipeline else None
            if done is not None:
                done.record(self.side_stream)
                for t in (embeds, source, noise, frames):
                    t.record_stream(self.main_stream)
        batch.keep = [batch.host_frames, batch.images]
        batch.entry = entry
        batch.device_frames = frames
        batch.tensors = (noise, source, embeds, done, ev)
        return batch

    def _generate(self, batch: _Batch) -> _Batch:
        """Main stream: wait for the side stream's event, denoise, decode, copy to the host."""
        noise, source, embeds, done, ev = batch.tensors
        if done is not None:
            self.main_stream.wait_event(done)
        timings = batch.entry.setdefault("host_ms", {})
        ev["cond0"] = self._event(self.main_stream)
        if self.temporal is not None and self.adapter is not None:
            self.temporal.apply(batch.plan, batch.device_frames, timings)
        ev["unet0"] = self._event(self.main_stream)
        latents = self.denoiser.denoise(noise, source, embeds)
        ev["unet1"] = self._event(self.main_stream)
        images = self.denoiser.decode(latents)
        ev["dec1"] = self._event(self.main_stream)
        if self.temporal is not None:
            self.temporal.remember(images, batch.count)
        batch.device_frames = None
        if self.cuda:
            host = torch.empty(images.shape, dtype=torch.uint8, pin_memory=True)
            host.copy_(images, non_blocking=True)
            batch.ready = torch.cuda.Event()
            batch.ready.record(self.main_stream)
            batch.keep.append(images)
        else:
            host, batch.ready = images, None
        batch.output = host
        batch.tensors = (None, None, None, None, ev)  # free device tensors early
        return batch

    def _finish(self, batch: _Batch) -> Iterator[np.ndarray]:
        if batch.ready is not None:
            batch.ready.synchronize()
        out = batch.output.numpy()
        entry = batch.entry
        entry["t_done"] = time.perf_counter()
        ev = batch.tensors[-1]
        if all(v is not None for v in ev.values()):
            entry["ms"] = {"te": ev["te0"].elapsed_time(ev["te1"]), "vae_encode": ev["te1"].elapsed_time(ev["enc1"]),
                           "unet": ev["unet0"].elapsed_time(ev["unet1"]), "vae_decode": ev["unet1"].elapsed_time(ev["dec1"]),
                           "cond": ev["cond0"].elapsed_time(ev["unet0"])}
        self.batch_log.append(entry)
        if len(self.batch_log) > self.config.log_limit:
            del self.batch_log[: len(self.batch_log) - self.config.log_limit]
        self.stats["batches"] += 1
        self.stats["frames"] += batch.count
        batch.keep.clear()
        for i in range(batch.count):
            yield out[i]

    def close(self) -> None:
        """Stop the worker threads and detach the adapter from the (shared) U-Net."""
        self._pool.shutdown(wait=False, cancel_futures=True)
        if self.temporal is not None:
            self.temporal.close()
        if self.adapter is not None:
            from .lllite import remove_lllite

            remove_lllite(self.models.unet)


def _attach_adapter(models, config: EngineConfig):
    """Load/build the LLLite adapter, patch it into the U-Net and size its buffers (before compile)."""
    if config.lllite is None:
        return None
    from .lllite import LLLiteAdapter, apply_lllite

    if isinstance(config.lllite, LLLiteAdapter):
        adapter = config.lllite
    elif config.lllite == "random":  # speed work: real shapes, small random weights
        adapter = LLLiteAdapter.for_unet(models.unet, hooks=config.hooks, cond_size=config.size)
        with torch.no_grad():
            for _, module in adapter.items():
                module.up[0].weight.normal_(0, 1e-3)
    else:
        adapter = LLLiteAdapter.load(config.lllite, models.unet, hooks=config.hooks)
    apply_lllite(models.unet, adapter, inference_mode=True)
    adapter.allocate(config.batch_size, config.size, config.size)
    adapter.set_multiplier(config.lllite_multiplier)
    return adapter


def clean_prompt(prompt: str) -> str:
    """The prompt as the engine will use it; an empty one raises, an over-long one is truncated."""
    prompt = (prompt or "").strip()
    if not prompt:
        raise StreameditError("the prompt is empty: say what the edit should do, e.g. --prompt 'oil painting'")
    if len(prompt) > MAX_PROMPT_CHARS:
        log.warning("prompt is %d characters; truncated to %d", len(prompt), MAX_PROMPT_CHARS)
        prompt = prompt[:MAX_PROMPT_CHARS]
    return prompt


def _to_working(frame: np.ndarray, size: int) -> np.ndarray:
    frame = np.asarray(frame)
    if frame.ndim != 3 or frame.shape[2] != 3 or frame.dtype != np.uint8:
        raise StreameditError(f"frames must be HxWx3 uint8 RGB arrays, got shape {frame.shape} dtype {frame.dtype}")
    if frame.shape[:2] != (size, size):
        frame = cv2.resize(frame, (size, size), interpolation=cv2.INTER_AREA)
    return np.ascontiguousarray(frame)


def _validate(models, config: EngineConfig) -> None:
    if not 1 <= config.steps <= 4:
        raise StreameditError(f"--steps must be 1..4 for the distilled model, got {config.steps}")
    if config.batch_size < 1:
        raise StreameditError(f"--batch must be >= 1, got {config.batch_size}")
    if config.cond_refresh_every < 1:
        raise StreameditError(f"--cond-refresh must be >= 1, got {config.cond_refresh_every}")
    if config.te_refresh_every < 1:
        raise StreameditError(f"te_refresh_every must be >= 1, got {config.te_refresh_every}")
    step = models.vae_scale_factor * 4  # the U-Net downsamples the latent twice
    if config.size < step or config.size % step:
        raise StreameditError(f"--size must be a multiple of {step}, got {config.size}")
