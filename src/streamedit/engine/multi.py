"""Many streams, one model: a scheduler over the engine's path (engine/build.py, the same text encoder,
denoiser and adapter a :class:`~streamedit.engine.stream.StreamEngine` runs).

Each tick takes the newest pending frame of up to B = ``max(buckets)`` streams of one working size, the
least recently served first (round robin: K always-ready streams get min(K, B)/K of the ticks each; size
groups take turns the same way), and runs them as one batch padded to the next bucket size::

    host (engine thread) : take frames, temporal plans (flows on a shared pool), TE inputs per prompt
    side stream          : TE once per prompt group -> embeddings stacked in row order (zero-padded to the
                           longest, with a mask); VAE encode; each stream's own noise
    main stream          : write cond rows that changed (adapter on); U-Net + decode; D2H
    host                 : each row's output to its stream (callback or queue), its stats

Per row, everything that makes a stream's output is its own: frame, prompt, noise (the stream's seed),
and with the temporal adapter its conditioner (previous output, flows, refresh schedule, scene cuts) and
its cond embedding, written into the adapter's buffer row the stream occupies (buffers are per row: one
U-Net for all streams). A stream keeps its row from tick to tick where it can, so its row is rewritten only
on its refresh batches (the cond CNN) or when it moved (a copy of its kept embedding). Joining or leaving
touches no model.

``start()`` (engine/ticks.py) runs ticks on a thread, launching tick k+1 before it hands out tick k (as
StreamEngine's pipelined schedule); ``tick()`` runs one synchronously. A stream whose input breaks its own
host work is ended alone (``Stream.fail``); any other failed tick ends every stream with the reason.
``report()``: per-stream fps, latency, drops; batch-size histogram; device busy share (multistats.py).
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import logging
import threading
import time
from collections import Counter, deque
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from ..accel import compile_cache
from ..accel.compile_main import own_graphs, release_graphs
from ..accel.graphs import release_memory
from ..config import EngineConfig, check_frame, clean_prompt, engine_shape, validate
from ..diffusion.denoiser import Denoiser
from ..errors import StreameditError
from ..models.loading import warn_unknown_instruction
from ..telemetry import EngineStats, TickRecord
from ..temporal.adapter import remove_lllite
from ..temporal.attach import attach_adapter
from ..temporal.conditioner import TemporalConditioner
from .build import build_denoiser, text_encoder
from .host import to_working
from .multistats import BusyClock, Laps, engine_report, rows_per_tick, time_buckets, warm_items
from .rows import PROMPT_TOKENS, TOKEN_STEP, RowBatch, SizeGroup, assign_rows, default_buckets, tick_text
from .streams import Pending, Stream, StreamOutput, latency_ms
from .ticks import TickDriver

__all__ = ["MultiStreamEngine", "Stream", "StreamOutput", "default_buckets"]
log = logging.getLogger(__name__)


class MultiStreamEngine(TickDriver):
    def __init__(self, models, config: EngineConfig, max_streams: int = 8, buckets: tuple[int, ...] | None = None):
        """``config`` as for StreamEngine (``prompt``: the default of :meth:`open_stream`; ``batch_size``: the
        largest bucket unless ``buckets`` are given); the schedule options (pipeline, prefetch, low_latency)
        are this engine's own."""
        validate(models, config)
        if config.te_batch_one or config.te_refresh_every > 1 or config.skip_similar is not None:
            raise StreameditError("the multi-stream engine encodes every frame: te_batch_one, te_refresh_every "
                                  "and skip_similar are single-stream options")
        self.buckets = tuple(sorted(set(buckets or default_buckets(config.batch_size))))
        if self.buckets[0] < 1 or max_streams < 1:
            raise StreameditError(f"buckets and max_streams must be >= 1, got {self.buckets}, {max_streams}")
        self.models, self.config, self.max_streams = models, config, max_streams
        self.device = models.device
        self.cuda = self.device.type == "cuda"
        self.pipelined = self.cuda  # start(): tick k+1 is queued before tick k is handed out (ticks.py)
        self.te = text_encoder(models, config, prompt_tokens=PROMPT_TOKENS,  # a prompt change: no recompile
                               rows=self.buckets[-1])
        self.adapter = attach_adapter(models, config.temporal, config.size)  # patches the U-Net: before compiling
        self._owns_adapter = self.adapter is not None and self.adapter is not config.lllite
        self._flow_pool = ThreadPoolExecutor(4, thread_name_prefix="streamedit-flow") if self.adapter else None
        self._row_index: dict[tuple[int, ...], torch.Tensor] = {}  # cond rows -> their index on the device
        self._groups: dict[tuple[int, int], SizeGroup] = {}  # working size -> its denoisers and adapter rows
        self._streams: list[Stream] = []
        self._ids = itertools.count()
        self._served = itertools.count()  # serve order: fairness (_select)
        self._cond = threading.Condition()  # a frame arrived / stop
        self._thread: threading.Thread | None = None
        self._handout = self._finisher = None  # start() on CUDA: the hand-out queue and thread (ticks.py)
        self._stopping = False
        self.error: BaseException | None = None  # what ended the tick thread
        self.ticks = 0
        self.histogram: Counter[int] = Counter()  # real rows per batch -> batches
        self.tick_log: deque[TickRecord] = deque(maxlen=config.log_limit)
        self.stats = EngineStats()
        self.warm_seconds: dict[tuple, float] = {}  # (working size, bucket) -> prepare(warm=True)'s first batch
        self.batch_seconds: dict[tuple, dict[int, float]] = {}  # working size -> bucket -> s (prepare(measure=))
        self.clock = BusyClock(self.cuda)
        self._last_done = 0.0  # when the last batch's outputs reached the host (ticks.py: _hold_s)
        self._launch_s = 0.0  # the host's time to queue a batch, a running average (ticks.py: _hold_s)
        self.main_stream = self.side_stream = self.copy_stream = None
        if self.cuda:  # as StreamEngine: the main stream is the critical path
            self.main_stream = (torch.cuda.Stream(self.device, priority=-100) if config.main_priority
                                else torch.cuda.current_stream(self.device))
            self.side_stream, self.copy_stream = torch.cuda.Stream(self.device), torch.cuda.Stream(self.device)
        self._closed = False
        shape = engine_shape(models, config)
        if shape is not None:
            try:
                self._group(shape)
            except BaseException:
                self.close()
                raise

    # ---- streams --------------------------------------------------------------------------------
    def open_stream(self, prompt: str | None = None, seed: int | None = None, on_output=None,
                    frame_size: tuple[int, int] | None = None, size: int | None = None, on_error=None) -> Stream:
        """A new stream. ``size``: the long side of its working size (default ``config.size``; streams of
        one working size share batches); the aspect from ``frame_size``, the config's, or its first frame.
        Outputs go to ``on_output(StreamOutput)`` (called on the engine's thread) or to ``stream.get()``;
        ``on_error(message)`` is called if the engine ends the stream (Stream.fail)."""
        self._check_open()
        if self.error is not None:
            raise StreameditError(f"the engine stopped after a failed tick: {self.error!r}"[:300])
        size = size or self.config.size
        if size != self.config.size:
            validate(self.models, dataclasses.replace(self.config, size=size))
        seed = self.config.seed if seed is None else seed
        self.te.check_prompt(clean_prompt(prompt or self.config.prompt))
        with self._cond:
            if len(self._streams) >= self.max_streams:
                raise StreameditError(f"this engine serves at most {self.max_streams} streams")
            stream = Stream(self, next(self._ids), prompt or self.config.prompt, seed, self.config.fixed_noise,
                            on_output, self._shape(size, frame_size), on_error)
            stream.size = size
            if self.adapter is not None:
                stream.temporal = TemporalConditioner.from_options(self.adapter, self.config.temporal,
                                                                   stagger=False, pool=self._flow_pool)
            self._streams.append(stream)
        warn_unknown_instruction(self.models, stream.prompt)
        return stream

    @property
    def streams(self) -> list[Stream]:
        with self._cond:
            return list(self._streams)

    def _submit(self, stream: Stream, frame: np.ndarray, meta) -> int:
        if stream.closed:
            raise StreameditError("this stream " + (f"failed: {stream.error}" if stream.error else "is closed"))
        frame = check_frame(frame)
        if stream.shape is None:
            stream.shape = self._shape(stream.size, frame.shape[:2])
        working = to_working(frame, stream.shape, self.config.crop)
        # its scene-cut histogram and a refresh's flow (on the flow pool), now rather than in the tick's launch
        early = stream.temporal.early(working) if stream.temporal is not None else None
        pending = Pending(stream.next_index(), working, meta, time.perf_counter(), early)
        with self._cond:
            stream.put(pending)
            self._cond.notify()
        return pending.index

    def _close_stream(self, stream: Stream) -> None:
        with self._cond:
            was_open, stream.closed = not stream.closed, True
            stream.take()
            if stream in self._streams:
                self._streams.remove(stream)
        if was_open:
            stream.ended()
        # its conditioner is only dropped: a tick in flight may still use it (flows run on the shared pool)

    # ---- scheduling -------------------------------------------------------------------------------
    def _next_group(self) -> tuple[tuple[int, int] | None, list]:
        """(under ``_cond``) The size group the next batch serves: the least recently served ready stream's
        working size, and that size's ready streams, least recently served first ((None, []): none ready)."""
        ready = sorted((s for s in self._streams if s.pending is not None), key=lambda s: (s.last_served, s.id))
        if not ready:
            return None, []
        return ready[0].shape, [s for s in ready if s.shape == ready[0].shape]

    def _select(self) -> tuple[int, tuple[int, int], list] | None:
        """The streams of the next batch (under ``_cond``): :meth:`_next_group`'s, as many as serve the most
        frames per second at that size's measured batch times (``multistats.rows_per_tick``; up to the
        largest bucket)."""
        shape, same = self._next_group()
        if not same:
            return None
        chosen = same[: rows_per_tick(self.batch_seconds.get(shape), len(same), self.buckets)]
        for s in chosen:
            s.last_served = next(self._served)  # in batch order: the left-out rotate (round robin)
        self.ticks += 1
        return self.ticks - 1, shape, [(s, s.take()) for s in chosen]

    # ---- the batch (tick(), start(): engine/ticks.py) ----------------------------------------------
    def _rows_of(self, items: list, latent: tuple) -> list:
        """Each stream's own host work (noise, temporal plan: flows, scene cut): a stream whose input breaks it
        is ended with the reason and left out of the batch; the others go on."""
        kept = []
        for s, p in items:
            try:
                noise = s.noise(latent, self.models.dtype)
                plan = s.temporal.plan([p.frame], 1, p.early) if s.temporal is not None else None
            except Exception as exc:  # noqa: BLE001  (attributable to this stream's input)
                log.warning("stream %d: its frame broke the tick, ending it: %s", s.id, exc)
                s.fail(f"its frame could not be processed: {exc}"[:300])
                continue
            kept.append((s, p, noise, plan))
        return kept

    def _launch(self, index: int, shape: tuple[int, int], items: list) -> RowBatch | None:
        """Queue one batch: host preparation, then the side stream's and the main stream's work (None:
        every stream's input failed its own preparation)."""
        t_start = time.perf_counter()
        group = self._group(shape)
        den0 = next(iter(group.denoisers.values()))
        items = self._rows_of(items, (1, self.models.vae.config.latent_channels, *den0.latent_shape))
        if not items:
            return None
        bucket = next(b for b in self.buckets if b >= len(items))
        tick = RowBatch(group, [None] * bucket)
        for r, item in zip(assign_rows(group.owners, [it[0].id for it in items], bucket), items):
            tick.rows[r] = item
        real = tick.real
        tick.record = TickRecord(index, shape, tuple(it[0].id if it else None for it in tick.rows),
                                 tuple(it[0].prompt if it else None for it in tick.rows), t_start)
        self.tick_log.append(tick.record)
        lap = Laps(tick.record.phases_ms, t_start)
        lap("rows")  # each stream's noise and temporal plan (its flows queued), rows assigned
        filler = tick.rows[real[0][0]]  # padding rows repeat a real row's frame and noise; outputs dropped
        frames = [(it or filler)[1].frame for it in tick.rows]
        prompts = {r: tick.record.prompts[r] for r, _, _ in real}  # a change applies from the next tick
        for r, s, _ in real:
            if s.temporal is not None:
                tick.plans[r] = tick.rows[r][3]
        host = torch.empty((len(frames), *frames[0].shape), dtype=torch.uint8, pin_memory=self.cuda)
        np.stack(frames, out=host.numpy())  # into pinned memory: one copy, not a stack then a pin
        den = group.denoisers[bucket]
        noise = torch.cat([(it or filler)[2] for it in tick.rows])
        lap("stack")
        with self._on(self.side_stream):
            tick.started = self.clock.event(self.side_stream)
            compiled = self.config.compile  # compiled: TE batches padded to a captured batch size
            text, te_calls = tick_text(self.te, frames, prompts, bucket, self.buckets if compiled else None,
                                       TOKEN_STEP if compiled else 1)
            lap("text")
            frames_dev = host.to(self.device, non_blocking=True)
            source = den.encode(frames_dev)
            noise = noise.to(self.device, non_blocking=True)
            if self.cuda:
                tick.done = torch.cuda.Event()
                tick.done.record(self.side_stream)
                for t in (noise, source, frames_dev, *text):
                    t.record_stream(self.main_stream)
        tick.device = (noise, source, text, frames_dev)
        lap("encode")
        self.stats.te_calls += te_calls
        self.stats.te_frames += len(real)
        tick.record.te_calls = te_calls
        with self._on(self.main_stream):
            self._generate(tick, den, lap)
        took = time.perf_counter() - t_start
        if group.cache_key is not None:  # its first compiled batch (compiled by now): keep the artifacts
            compile_cache.save_artifacts(group.cache_key)
            group.cache_key = None
        tick.record.launch_ms = 1e3 * took
        self._launch_s = took if not self._launch_s else 0.8 * self._launch_s + 0.2 * took
        return tick

    def _generate(self, tick: RowBatch, den: Denoiser, lap) -> None:
        """Main stream: the cond rows, U-Net + decode, each stream's previous output, the copy to the host."""
        noise, source, text, frames = tick.device
        if tick.done is not None:
            self.main_stream.wait_event(tick.done)
        if self.adapter is not None:
            self._write_cond(tick, frames, lap)  # laps "flow" (waited for, warped) and "cond" (embedded, rows)
        if den.fused is not None:  # U-Net x steps + decode + uint8: one compiled graph
            images, _ = den.fused(noise, source, *text)  # (frames, final latents)
        else:
            images = (den.decode_fn or den.decode)(den.denoise(noise, source, *text))
        lap("unet")
        for r, s, _ in tick.real:
            if s.temporal is not None:  # a copy: the next replay overwrites a graph's output
                s.temporal.remember(images[r:r + 1].clone(), 1)
        tick.device = ()
        if self.cuda:
            host = torch.empty(images.shape, dtype=torch.uint8, pin_memory=True)
            images = images.clone()
            self.copy_stream.wait_stream(self.main_stream)
            images.record_stream(self.copy_stream)
            with self._on(self.copy_stream):
                host.copy_(images, non_blocking=True)
                tick.ready = self.clock.event(self.copy_stream)
        else:
            host = images
        tick.output = host
        lap("copy")

    def _write_cond(self, tick: RowBatch, frames: torch.Tensor, lap) -> None:
        """Each stream's cond embedding into its row: new on its refresh batches (its own conditioner; one cond
        CNN pass for every refreshed stream), copied from the stream's kept embedding when another stream
        used the row since (more streams than rows move every tick: a copy, not the CNN again)."""
        group, fresh = tick.group, []
        for r, s, _ in tick.real:
            if s.temporal is not None and tick.plans[r].refresh:  # (None: a warm-up row)
                fresh.append((s, s.temporal.cond_images(tick.plans[r], frames[r:r + 1], {})))
        lap("flow")
        if fresh:
            embedded = self.adapter.row_embeddings(torch.cat([image for _, image in fresh]))
            for i, (s, _) in enumerate(fresh):
                s.cond = {stride: emb[i:i + 1] for stride, emb in embedded.items()}
                s.cond_version += 1
        rows, kept = [], []
        for r, s, _ in tick.real:
            if s.temporal is not None and group.owners[r] != (s.id, s.cond_version):
                group.owners[r] = (s.id, s.cond_version)
                rows.append(r)
                kept.append(s.cond)
        tick.record.cond_rows, tick.record.cond_embedded = len(rows), len(fresh)
        if rows:
            key = tuple(rows)
            if key not in self._row_index:  # made once: a host-to-device copy here would wait for the main stream
                self._row_index[key] = torch.tensor(rows, device=frames.device)
            joined = {stride: torch.cat([c[stride] for c in kept]) if len(kept) > 1 else kept[0][stride]
                      for stride in kept[0]}
            self.adapter.write_rows(joined, self._row_index[key])
        lap("cond")

    def _finish(self, tick: RowBatch) -> None:
        """Wait for the tick's outputs and hand each to its stream (a closed stream's are dropped)."""
        t_wait = time.perf_counter()
        if tick.ready is not None:
            tick.ready.synchronize()
        out = tick.output.numpy()
        real = tick.real
        self.stats.batches += 1
        self.stats.frames += len(real)
        self.histogram[len(real)] += 1
        tick.record.t_done = self._last_done = time.perf_counter()
        tick.record.wait_ms = 1e3 * (tick.record.t_done - t_wait)
        self.clock.add(tick.record.t_launch, tick.record.t_done, tick.started, tick.ready)
        for r, s, p in real:
            if s.closed:
                continue
            try:
                s.deliver(StreamOutput(p.index, out[r], p.meta, latency_ms(p.t_submit), tick.record.prompts[r]))
            except Exception:  # noqa: BLE001  (a broken consumer affects only its own stream)
                log.exception("stream %d: its output callback failed", s.id)

    # ---- sizes -------------------------------------------------------------------------------------
    def _shape(self, size: int, frame_size) -> tuple[int, int] | None:
        config = self.config if size == self.config.size else dataclasses.replace(self.config, size=size)
        return engine_shape(self.models, config, tuple(frame_size) if frame_size else None)

    def prepare(self, frame_size: tuple[int, int], size: int | None = None, warm: bool = False,
                measure: int = 0) -> tuple[int, int]:
        """Build (and compile) what streams with input frames of ``frame_size`` need, before one joins; with
        ``warm`` run one batch of each bucket (on CUDA: every graph captured now; ``warm_seconds``); with
        ``measure`` > 0 then time that many batches of each bucket (``batch_seconds[shape]``, the median).
        Returns the working (h, w). Streams of a prepared size join without building anything."""
        self._check_open()
        if self._thread is not None:
            raise StreameditError("prepare() before start(): the tick thread owns the adapter's buffers")
        shape = self._shape(size or self.config.size, frame_size)
        self._group(shape)
        if warm or measure:
            for bucket in self.buckets:
                t0 = time.perf_counter()
                self._finish(self._launch(-1, shape, warm_items(self, shape, bucket)))
                self.warm_seconds[(shape, bucket)] = time.perf_counter() - t0
            if measure:
                self.batch_seconds[shape] = time_buckets(self, shape, measure)
            self.tick_log.clear()
            self.histogram.clear()
            self.stats = EngineStats()
            self.clock.reset()
        return shape

    def _group(self, shape: tuple[int, int]) -> SizeGroup:
        group = self._groups.get(shape)
        if group is None:
            den, key = build_denoiser(self.models, self.config, shape, self.te, self.adapter, self.buckets[-1])
            group = SizeGroup(shape, {b: own_graphs(den) for b in self.buckets}, cache_key=key,
                           owners=[None] * self.buckets[-1])
            if self.adapter is not None:
                group.buffers = self.adapter.buffer_set()
            self._groups[shape] = group
        elif self.adapter is not None and self.adapter.rows and self.adapter.buffer_set()[1][1:] != shape:
            self.adapter.use_buffer_set(group.buffers)  # another size ran last: its graphs read its own buffers
        return group

    # ---- lifecycle ---------------------------------------------------------------------------------
    def report(self) -> dict:
        """Per-stream fps / latency / drops, batch-size histogram, busy share, batch times (multistats.py)."""
        return engine_report(self)

    def _on(self, stream):
        return torch.cuda.stream(stream) if self.cuda else contextlib.nullcontext()

    def _check_open(self) -> None:
        if self._closed:
            raise StreameditError("this engine is closed: build a new MultiStreamEngine")

    def close(self) -> None:
        """Stop the thread, close every stream, release what this engine built (StreamEngine.close's order:
        threads, streams synchronised, the LLLite patch off the shared U-Net, graphs, buffers, memory)."""
        if self._closed:
            return
        self.stop()
        self._closed = True
        for s in self.streams:
            s.close()
        if self._flow_pool is not None:
            self._flow_pool.shutdown(wait=True, cancel_futures=True)
        if self.cuda:
            for stream in {self.main_stream, self.side_stream, self.copy_stream}:
                stream.synchronize()
        if self.adapter is not None:
            remove_lllite(self.models.unet)
        for group in self._groups.values():
            for den in group.denoisers.values():
                release_graphs(den)
            group.buffers = None
        self._groups.clear()
        self.te.release()
        if self._owns_adapter:
            self.adapter.release_buffers()
        release_memory(self.device)

    def __enter__(self) -> "MultiStreamEngine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


