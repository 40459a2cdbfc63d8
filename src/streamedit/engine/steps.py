"""One batch's device steps, a mixin of StreamEngine: side-stream encode, main-stream generate, in-order hand-out.

``_encode`` (side stream: TE unless reused, VAE encode), ``_generate`` (main stream: cond, U-Net + decode, async
copy to the host) and ``_finish`` (host: wait, hand the frames out, record the batch) run on the engine's state
(config, models, streams, text encoder, denoiser, temporal conditioner, caches and counters, all set up in
``StreamEngine.__init__``). The engine's schedules in engine/stream.py interleave them across batches.
"""

from __future__ import annotations

import contextlib
import time
from typing import Iterator

import numpy as np
import torch

from ..accel import compile_cache
from ..accel.compile_main import warm_main
from ..telemetry import SPANS, BatchRecord
from .batch import Batch, DeviceBatch

__all__ = ["BatchSteps"]


class BatchSteps:
    """``_encode`` (side stream), ``_generate`` (main stream) and ``_finish`` (host) of one batch."""

    def _stream(self, stream):
        return torch.cuda.stream(stream) if self.cuda else contextlib.nullcontext()

    def _event(self, stream=None):
        if not (self.cuda and self.config.profile):
            return None
        ev = torch.cuda.Event(enable_timing=True)
        ev.record(stream)
        return ev

    def _encode(self, batch: Batch) -> Batch:
        """Side stream: TE (unless its output is reused) and VAE encode of the source frames."""
        self._check_open()  # a generator of run() resumed after close()
        cfg, bsz = self.config, self.config.batch_size
        prompt = self._prompt
        self._inflight += 1
        if self.probe is not None:  # the engine's first probe.batches batches, over all run() calls
            slot = self.probe.claim()
            batch.probe = {"slot": slot} if slot is not None else None
        if self._similar is not None:
            self._decide_skips(batch, prompt)
        skipped = sum(batch.skip) if batch.skip else 0
        record = batch.record = BatchRecord(batch.index, batch.count, prompt, time.perf_counter(), skipped)
        if skipped == batch.count:  # every frame re-emits the last output: nothing to launch
            record.te = "skipped"
            return batch
        self._encoded_prompt = prompt
        forced = batch.plan is not None and batch.plan.force_te
        reuse = (self._te_cache is not None and prompt == self._te_prompt and self._te_age < cfg.te_refresh_every
                 and not forced)
        noise = self._noise(bsz)
        probing = batch.probe is not None
        if probing:
            replay = self.probe.replay_noise(batch.probe["slot"])
            noise = replay.to(noise.dtype) if replay is not None else noise
            batch.probe["noise"] = noise.clone()
        record.te = "reused" if reuse else "computed"
        if batch.plan is not None:
            record.cond = batch.plan.reason if batch.plan.refresh else "reuse"
            record.cut_at = batch.plan.cut_at
        if not self._main_warm_started:  # warm start: the main graph's set-up overlaps the TE's loading
            self._main_warm_started = True
            shape = self.te.output_shape(prompt)  # None: known only after the first encode (exact TE)
            if cfg.warm_on_worker and self.denoiser.fused is not None and shape is not None:
                self._main_warm = warm_main(self.denoiser, bsz, shape, masked=self.te.text_mask(prompt) is not None)
                self.main_warmed_on_worker = self._main_warm is not None
        ev = batch.events
        with self._stream(self.side_stream):
            ev["te0"] = self._event(self.side_stream)
            if not reuse:
                te_batch = 1 if cfg.te_batch_one else bsz
                self._te_cache = self.te.encode(prompt, batch.images, te_batch)
                self._te_prompt, self._te_age = prompt, 0
                self.stats.te_calls += 1
                self.stats.te_frames += te_batch
            self._te_age += 1
            embeds = self._te_cache.expand(bsz, -1, -1)
            mask = self.te.text_mask(self._te_prompt)  # te_size 256: the padded sequence's mask, for the U-Net
            mask = mask.expand(bsz, -1) if mask is not None else None
            if probing:  # copies: the TE's output may be a graph buffer that the next replay overwrites
                batch.probe.update(embeds=embeds.clone(), mask=None if mask is None else mask.clone())
            ev["te1"] = self._event(self.side_stream)
            frames = batch.host_frames.to(self.device, non_blocking=True)
            source = self.denoiser.encode(frames)
            noise = noise.to(self.device, non_blocking=True)
            ev["enc1"] = self._event(self.side_stream)
            done = torch.cuda.Event() if self.cuda and cfg.pipeline else None
            if done is not None:
                done.record(self.side_stream)
                for t in (embeds, source, noise, frames, *([mask] if mask is not None else [])):
                    t.record_stream(self.main_stream)
        batch.keep = [batch.host_frames, batch.images]
        batch.device = DeviceBatch(noise, source, embeds, mask, frames, done)
        return batch

    def _generate(self, batch: Batch) -> Batch:
        """Main stream: wait for the side stream's event, denoise, decode, copy to the host."""
        if batch.device is None:  # skipped batch
            return batch
        with self._stream(self.main_stream):
            return self._generate_on_main(batch)

    def _generate_on_main(self, batch: Batch) -> Batch:
        if self._main_warm is not None:
            self._main_warm.result()  # its capture is done (or its error raised here)
            self._main_warm = None
        dev, ev = batch.device, batch.events
        ev["main0"] = self._event(self.main_stream)  # main0 -> cond0: the main stream waiting for the side
        if dev.done is not None:
            self.main_stream.wait_event(dev.done)
        ev["cond0"] = self._event(self.main_stream)
        if self.temporal is not None and self.adapter is not None:
            self.temporal.apply(batch.plan, dev.frames, batch.record.host_ms)
        ev["unet0"] = self._event(self.main_stream)
        if self.denoiser.fused is not None:  # U-Net x steps + decode + uint8: one compiled graph
            images, latents = self.denoiser.fused(dev.noise, dev.source, *dev.text)
        else:
            latents = self.denoiser.denoise(dev.noise, dev.source, *dev.text)
            ev["unet1"] = self._event(self.main_stream)
            images = (self.denoiser.decode_fn or self.denoiser.decode)(latents)
        ev["dec1"] = self._event(self.main_stream)
        if batch.probe is not None:
            batch.probe["latents"] = latents.clone()  # the fused graph's output buffer is overwritten next batch
        if self.temporal is not None:
            self.temporal.remember(images, batch.count)
        batch.device = None  # free the side stream's tensors early
        if self.cuda:
            host = torch.empty(images.shape, dtype=torch.uint8, pin_memory=True)
            if self.copy_stream is not self.main_stream:
                images = images.clone()  # a graph's output is overwritten by its next replay; this copy is ~10 us
                self.copy_stream.wait_stream(self.main_stream)
                images.record_stream(self.copy_stream)
            with self._stream(self.copy_stream):
                host.copy_(images, non_blocking=True)
                batch.ready = torch.cuda.Event()
                batch.ready.record(self.copy_stream)
                ev["out1"] = self._event(self.copy_stream)
            batch.keep.append(images)
        else:
            host, batch.ready = images, None
        batch.output = host
        return batch

    def _finish(self, batch: Batch) -> Iterator[np.ndarray]:
        if batch.ready is not None:
            batch.ready.synchronize()
        out = batch.output.numpy() if batch.output is not None else None
        if batch.probe is not None:
            p, batch.probe = batch.probe, None
            self.probe.add(p["slot"], batch.count, batch.skip, p.get("noise"), p.get("embeds"), p.get("mask"),
                           p.get("latents"))
        record, ev = batch.record, batch.events
        record.t_done = time.perf_counter()
        if ev and all(v is not None for v in ev.values()):
            record.ms = {s.name: ev[s.start].elapsed_time(ev[s.end]) for s in SPANS
                         if s.start in ev and s.end in ev and (s.name != "unet_decode" or "unet1" not in ev)}
        self.batch_log.append(record)
        if len(self.batch_log) > self.config.log_limit:
            del self.batch_log[: len(self.batch_log) - self.config.log_limit]
        self.stats.batches += 1
        self.stats.frames += batch.count
        self.stats.skipped_frames += record.skipped
        self.stats.skipped_batches += out is None
        self._inflight -= 1
        batch.keep.clear()
        skip = batch.skip or [False] * batch.count
        for i in range(batch.count):
            if out is None or skip[i]:
                yield self._last_out.copy()  # a copy: the consumer may keep or modify what it gets
            else:
                self._last_out = out[i]
                yield out[i]
        if self._cache_key is not None:  # first compiled batch done: keep its compile artifacts
            compile_cache.save_artifacts(self._cache_key)
            self._cache_key = None
