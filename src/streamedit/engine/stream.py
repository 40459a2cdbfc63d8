"""The streaming engine: frames -> batch -> side stream (TE + VAE encode) -> main stream
(denoise + decode) -> frames out.

Schedule for batch k (CUDA, ``pipeline=True``)::

    prefetch thread : [prepare k+2]  (PIL resize for the TE, image processor, pinned host tensors)
    side stream     : [TE k+1][VAE enc k+1] --event--+
    main stream     : [U-Net k][VAE dec k] ----------+--> [cond k+1][U-Net k+1][VAE dec k+1] ...
    host            : launch side k+1 and main k+1 (queued behind main k), wait for main k, hand out k

The only join between the streams is one CUDA event per batch; tensors made on the side stream
and read on the main stream are ``record_stream``-ed so the caching allocator cannot reuse them
early. On CPU (or ``pipeline=False``) the same steps run in order on one stream. With ``compile``
the main stream's U-Net + decode is one compiled graph and the side stream's TE and VAE encode are
CUDA graphs of their own (accel/compile_main.py, accel/compile_te.py, accel/graphs.py).
This module holds the engine's set-up, host side, schedules and lifecycle; one batch's steps on the
device are engine/steps.py.

Two host schedules (:meth:`StreamEngine.run`):

* default (throughput): before it hands out batch k the host pulls batch k+1 from the source and
  queues both its streams' work, so that its side-stream work runs beside batch k's denoise and the
  main stream never waits for the host between batches (on the H100 that wait was ~1.5 ms of a
  54 ms batch). At B=1 with a camera this holds frame k until frame k+1 arrives (one frame period),
  plus ``prefetch`` batches pulled ahead.
* ``low_latency``: a reader thread pulls and prepares batches; the host launches each batch as soon
  as it is ready, and hands batch k out as soon as it is done unless batch k+1 is *already*
  waiting, in which case k+1 is launched first (both streams stay busy). It never waits for an
  input that has not arrived.

``skip_similar`` (engine/similarity.py): frames judged unchanged re-emit the last stylized output; a
batch of only such frames launches nothing on the GPU (no TE, VAE or U-Net).
"""

from __future__ import annotations

import itertools
import logging
import queue
from concurrent.futures import ThreadPoolExecutor
from typing import Iterable, Iterator

import numpy as np
import torch

from ..accel.compile_main import release_graphs
from ..accel.graphs import release_memory
from ..config import EngineConfig, check_frame, clean_prompt, engine_shape, validate
from ..errors import StreameditError
from ..models.loading import warn_unknown_instruction
from ..telemetry import BatchRecord, EngineStats
from ..temporal.adapter import remove_lllite
from ..temporal.attach import attach_adapter
from ..temporal.conditioner import CondPlan, TemporalConditioner
from ..text.base import TextEncoder
from .batch import Batch
from .build import build_denoiser, text_encoder
from .host import start_reader, to_working
from .probe import EngineProbe
from .similarity import SimilarityFilter, thumbnail
from .steps import BatchSteps

__all__ = ["StreamEngine"]
log = logging.getLogger(__name__)


class StreamEngine(BatchSteps):
    def __init__(self, models, config: EngineConfig):
        validate(models, config)
        self._prompt = clean_prompt(config.prompt)  # before anything is built or patched
        self.models, self.config = models, config
        self.device = models.device
        self.cuda = self.device.type == "cuda"
        text, temporal = config.text, config.temporal
        self.te: TextEncoder = text_encoder(models, config)
        self.adapter = attach_adapter(models, temporal, config.size)  # patches the U-Net: before compiling it
        self._owns_adapter = self.adapter is not None and self.adapter is not temporal.lllite  # close frees it
        try:  # a failure past this point must not leave the shared U-Net patched
            self.temporal = None
            if self.adapter is not None or (temporal.cut_refresh and text.te_refresh_every > 1):
                self.temporal = TemporalConditioner.from_options(
                    self.adapter, temporal, graph=self.cuda and config.compile and self.adapter is not None)
            self.shape = self.denoiser = None  # set by _setup, once the working size is known
            self._cache_key = None
            shape = engine_shape(models, config)
            if shape is not None:
                self._setup(shape)
        except BaseException:
            if self.temporal is not None:
                self.temporal.close()
            if self.adapter is not None:
                remove_lllite(models.unet)
            raise
        self.main_stream = None
        if self.cuda:  # the main stream is the critical path: at high priority the TE fills its gaps
            self.main_stream = (torch.cuda.Stream(self.device, priority=-100) if config.main_priority
                                else torch.cuda.current_stream(self.device))
        self.side_stream = torch.cuda.Stream(self.device) if self.cuda and config.pipeline else self.main_stream
        # device -> host copies of the outputs, so they do not hold the main stream between two batches
        self.copy_stream = torch.cuda.Stream(self.device) if self.cuda and config.pipeline else self.main_stream
        warn_unknown_instruction(models, self._prompt)
        self._fixed_noise = None
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="streamedit-prefetch")
        self._similar = self._pre_similar = None
        if config.skip_similar is not None:
            # prefetch thread: provisional decision (skip preparing batches that will be skipped);
            # main thread: the decision, against what was really stylized with the current prompt
            self._pre_similar = SimilarityFilter(config.skip_similar)
            self._similar = SimilarityFilter(config.skip_similar)
        self._start_run()
        self._inflight = 0  # batches encoded but not handed out yet
        self._main_warm = None  # Future of the main graph's first call on a worker (compile_main.warm_main)
        self._main_warm_started = False
        self.main_warmed_on_worker = False  # that first call was started on a worker (a warm start)
        self._reader = None  # (thread, stop event) of the low-latency schedule's reader
        self._closed = False
        self.probe: EngineProbe | None = None  # set before the first batch: records what it computed (probe.py)

    def _setup(self, shape: tuple[int, int]) -> None:
        """Everything that depends on the working (h, w) (engine/build.py)."""
        self.shape = shape
        self.denoiser, self._cache_key = build_denoiser(self.models, self.config, shape, self.te, self.adapter,
                                                        self.config.batch_size)

    def setup_for(self, frame_size: tuple[int, int]) -> tuple[int, int]:
        """Fix the working size for input frames of ``frame_size`` (h, w), if not fixed yet (the first
        frame of :meth:`run` does it otherwise); returns the working (h, w)."""
        if self.shape is None:
            self._setup(engine_shape(self.models, self.config, tuple(frame_size)))
        return self.shape

    # ---- public API -------------------------------------------------------------------------
    def set_prompt(self, prompt: str) -> None:
        """Change the instruction; the next batch whose encoding has not started uses it."""
        self._prompt = clean_prompt(prompt)
        warn_unknown_instruction(self.models, self._prompt)

    @property
    def prompt(self) -> str:
        return self._prompt

    def restart(self) -> None:
        """Start a new, independent run on what this engine built (compiled functions, graphs, buffers): the
        next frame is treated as a first one (noise from the seed, temporal state, the similarity filter and
        the reused TE output cleared), so the outputs equal a fresh engine's. Why: a worker that stylizes
        many shards (scale/shards.py) pays the engine's set-up (~13 s warm on an H100) once, not per shard."""
        self._check_open()
        if self._inflight:
            raise StreameditError("restart() while a run() is still handing out batches")
        self._start_run()
        if self.temporal is not None:
            self.temporal.restart()

    def _start_run(self) -> None:
        """The per-run state, as a new engine starts it and restart() starts it again."""
        self._noise_gen = torch.Generator("cpu").manual_seed(self.config.seed)
        self._te_prompt = self._te_cache = None  # prompt of the cached TE output, and that output
        self._te_age = 0
        self._encoded_prompt = None  # prompt of the last batch sent to the GPU
        self._last_out = None  # last stylized frame handed out (re-emitted for skipped frames)
        for f in (self._similar, self._pre_similar):
            if f is not None:
                f.reset()
        self.stats = EngineStats()
        self.batch_log: list[BatchRecord] = []  # the newest config.log_limit batches

    def skip_noise(self, frames: int) -> None:
        """Draw the starting noise of ``frames`` frames and drop it: a shard of a longer job (scale.shards)
        that starts at frame ``frames`` then gets the noise the whole job's run gives its frames."""
        if self.config.fixed_noise or frames <= 0:
            return
        if self.denoiser is None:
            raise RuntimeError("skip_noise before the working size is known (set config.frame_size)")
        shape = (1, self.models.vae.config.latent_channels, *self.denoiser.latent_shape)
        for _ in range(frames):  # one draw per frame, exactly as _noise draws them
            torch.randn(shape, generator=self._noise_gen, dtype=self.models.dtype)

    def run(self, frames: Iterable[np.ndarray]) -> Iterator[np.ndarray]:
        """Stylize a stream of HxWx3 uint8 RGB frames; yields the same number, in order, at the working
        size (the first frame fixes it unless ``config.frame_size`` or ``crop`` did)."""
        self._check_open()
        if self.shape is None:
            frames = iter(frames)
            first = next(frames, None)
            if first is None:
                return
            self.setup_for(check_frame(first).shape[:2])
            frames = itertools.chain([first], frames)
        try:
            if self.config.low_latency:
                yield from self._run_latency_first(frames)
            elif not self.config.pipeline:
                for batch in self._prefetched(self._batches(frames)):
                    yield from self._finish(self._generate(self._encode(batch)))
            else:
                yield from self._run_pipelined(self._prefetched(self._batches(frames)))
        finally:
            if self._inflight:  # stopped early: encoded outputs were never handed out
                self._inflight = 0
                if self._similar is not None:
                    self._similar.reset()

    def _check_open(self) -> None:
        if self._closed:
            raise StreameditError("this engine is closed: build a new StreamEngine")

    def process(self, frames: list[np.ndarray]) -> list[np.ndarray]:
        """Synchronous form of :meth:`run` for callers that hold a batch already (live serving)."""
        return list(self.run(frames))

    def _run_pipelined(self, batches: Iterator[Batch]) -> Iterator[np.ndarray]:
        """Batch k's side-stream work (TE + VAE encode) and main-stream work are both queued before the
        host waits for batch k-1, so the main stream already holds batch k while the host hands out
        k-1's frames and launches the next batch; TE(k+1) still runs during the U-Net of k."""
        launched = None  # queued on the GPU, not handed out yet
        for batch in batches:
            generated = self._generate(self._encode(batch))
            if launched is not None:
                yield from self._finish(launched)
            launched = generated
        if launched is not None:
            yield from self._finish(launched)

    def _run_latency_first(self, frames: Iterable[np.ndarray]) -> Iterator[np.ndarray]:
        """The low_latency schedule (module docstring): never wait for an input to hand out an output."""
        ready, stop, end, thread = start_reader(self._batches(frames), self._prepare, max(1, self.config.prefetch))
        self._reader = (thread, stop)
        pending = None  # launched on the GPU, not handed out yet
        try:
            while True:
                try:
                    item = ready.get(block=pending is None)
                except queue.Empty:
                    item = None  # nothing arrived: hand out what is done, do not wait
                if isinstance(item, BaseException):
                    raise item
                if item is end:
                    break
                launched = self._generate(self._encode(item)) if item is not None else None
                if pending is not None:
                    yield from self._finish(pending)
                pending = launched
            if pending is not None:
                yield from self._finish(pending)
        finally:
            stop.set()

    # ---- host side ------------------------------------------------------------------------
    def _batches(self, frames: Iterable[np.ndarray]) -> Iterator[tuple[int, list, int]]:
        shape, crop, bsz = self.shape, self.config.crop, self.config.batch_size
        chunk: list[np.ndarray] = []
        index = 0
        for frame in frames:
            chunk.append(to_working(frame, shape, crop))
            if len(chunk) == bsz:
                yield index, chunk, bsz
                index, chunk = index + 1, []
        if chunk:  # file mode never drops frames: pad with the last one, discard its outputs later
            count = len(chunk)
            yield index, chunk + [chunk[-1]] * (bsz - count), count

    def _prepare(self, item) -> Batch:
        index, frames, count = item
        batch = Batch(index, frames, count)
        if self._pre_similar is not None:
            batch.thumbs = [thumbnail(f) for f in frames[:count]]
            if all(self._pre_similar.mark(batch.thumbs)):
                return batch  # most likely skipped: prepared late (_fill) if it is not
        self._fill(batch)
        if self.temporal is not None:
            batch.plan = self.temporal.plan(frames, count)
        return batch

    def _fill(self, batch: Batch) -> None:
        """Host tensors of a batch (prefetch thread; main thread for a batch deferred by the filter)."""
        frames = batch.frames
        host = torch.from_numpy(np.stack(frames))
        batch.host_frames = host.pin_memory() if self.cuda else host
        batch.images = self.te.prepare_images(frames[:1] if self.config.te_batch_one else frames)  # pinned

    def _prefetched(self, items: Iterator) -> Iterator[Batch]:
        """Prepare up to `prefetch` batches ahead in a worker thread (PIL and numpy release the GIL)."""
        pending = []
        for item in items:
            pending.append(self._pool.submit(self._prepare, item))
            if len(pending) > self.config.prefetch:
                yield pending.pop(0).result()
        for fut in pending:
            yield fut.result()

    def _noise(self, batch: int) -> torch.Tensor:
        shape = (1, self.models.vae.config.latent_channels, *self.denoiser.latent_shape)
        dtype = self.models.dtype
        if self.config.fixed_noise:
            if self._fixed_noise is None:  # what upstream draws for generator=Generator("cpu").manual_seed(seed)
                self._fixed_noise = torch.randn(shape, generator=torch.Generator("cpu").manual_seed(self.config.seed),
                                                dtype=dtype)
            return self._fixed_noise.expand(batch, -1, -1, -1)
        # one draw per frame, so the noise of frame i does not depend on the batch size
        return torch.cat([torch.randn(shape, generator=self._noise_gen, dtype=dtype) for _ in range(batch)])

    def _decide_skips(self, batch: Batch, prompt: str) -> None:
        """The filter's decision for this batch, in stream order, against what was really stylized."""
        if prompt != self._encoded_prompt:  # outputs of an older prompt must not be re-emitted
            self._similar.reset()
        batch.skip = self._similar.mark(batch.thumbs)
        if not all(batch.skip) and batch.host_frames is None:
            self._fill(batch)  # the prefetch thread guessed "skipped" (prompt change, drift): prepare now
            if self.temporal is not None:
                batch.plan = CondPlan(False)  # keep the current cond embedding

    def close(self) -> None:
        """Release everything this engine owns, in an order that is safe with CUDA graphs. Idempotent.

        1. its threads: the prefetch pool, the low-latency reader, the flow pool and the main graph's
           first call on a worker (compile_main.warm_main) finish or are cancelled: nothing queues GPU work after;
        2. its streams are synchronised: no kernel of it is still running;
        3. the LLLite patch comes off the shared U-Net (the next engine on these models patches its own);
        4. its CUDA graphs (each takes its private memory pool along), then the tensors they read and wrote:
           static buffers, TE constants, cond rows, the last output, the cond buffers of an adapter it built;
        5. garbage collection, then synchronize + empty_cache, under the capture lock (graphs.release_memory):
           no other engine's capture is in flight while destructors run and memory goes back to the driver.

        The prompt, ``stats`` and ``batch_log`` stay readable; running the engine again raises.
        """
        if self._closed:
            return
        self._closed = True
        self._pool.shutdown(wait=True, cancel_futures=True)
        if self._reader is not None:  # a run() left suspended has not stopped its reader yet
            thread, stop = self._reader
            stop.set()
            thread.join(timeout=5.0)  # it may be preparing one batch, or waiting for the caller's frames
        if self._main_warm is not None:
            try:
                self._main_warm.result()
            except Exception as exc:  # noqa: BLE001  (its error was never raised: the engine never ran a batch)
                log.debug("main graph warm-up failed before close: %s", exc)
            self._main_warm = None
        if self.temporal is not None:
            self.temporal.close()
        if self.cuda:
            for stream in {self.main_stream, self.side_stream, self.copy_stream}:
                stream.synchronize()
        if self.adapter is not None:
            remove_lllite(self.models.unet)
        if self.temporal is not None:
            self.temporal.release()
        if self.denoiser is not None:  # None: no frame ever fixed the working size
            release_graphs(self.denoiser)
        self.te.release()
        if self._owns_adapter:
            self.adapter.release_buffers()
        self._te_cache = self._te_prompt = None

        release_memory(self.device)

    def __enter__(self) -> "StreamEngine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
