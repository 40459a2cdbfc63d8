"""Temporal conditioning for the LLLite adapter: flow-warped previous output, refresh schedule, scene cuts.

For batch k the cond image of frame i is the last decoded output of batch k-1 warped onto frame i
by Farnebäck flow computed on the *input* frames (at the working size, or ``flow_size``). Two flow
conventions exist, a property of the adapter (``LLLiteConfig.flow``, recorded in its file):

* ``"backward"`` (ours, the default; ``train pairs`` makes its pairs this way): the flow lives on the
  grid of frame i and points into the last input frame of batch k-1,
  ``F = calcOpticalFlowFarneback(frame_i, last_prev)``, and the cond image is the backward warp
  ``cond_i(x) = out_prev(x + F(x))``, which puts the previous stylization where the content is now.
* ``"forward"`` (the paper's released adapter, otanl/dreamlite-stream): the flow is computed previous
  -> current, ``F = calcOpticalFlowFarneback(last_prev, frame_i)`` (on the previous frame's grid), and
  the previous output is sampled at ``x - F(x)``, the approximation that adapter was trained with.

Both are one warp ``cond_i(x) = out_prev(x + D(x))`` with ``D = F`` (backward) or ``D = -F``
(forward): :func:`cond_flow`. Sampling is bilinear, border padding, align_corners=True. The first
batch (and frames after a scene cut) use the input frames themselves.

A cut refreshes its own batch: rows before the cut get the old shot's warped output, rows from the cut
their input frames. A cut in the middle of a batch (slot > 0) also refreshes the next batch (reason
``after_cut``, text encoder too): its rows before the cut slot would otherwise keep the old shot's cond
on new-shot frames until the next refresh; the batch after the cut warps the new shot's first output.

Work split, so nothing here sits on the main stream's critical path:

* :meth:`TemporalConditioner.plan` runs in the engine's prefetch thread, in batch order: it decides
  whether the batch refreshes the cond embedding (every ``cond_refresh_every`` batches, on a scene
  cut, or when motion since the last refresh exceeds a threshold) and, for refresh batches only,
  submits the flows to a thread pool (OpenCV releases the GIL).
* :meth:`TemporalConditioner.apply` runs on the main stream before the U-Net of the batch: on
  refresh batches it waits for the (long finished) flows, warps on the GPU with ``grid_sample`` and
  writes the adapter's cond buffers in place; on reuse batches it does nothing at all.

``stagger`` spreads the refresh evenly instead: batch k refreshes only the batch slots j with
``(k - j) % refresh_every == 0``, so every slot is still rebuilt every ``refresh_every`` batches
but each batch pays for ``B / refresh_every`` flows and cond CNNs (one at B = 8, N = 8) rather than
every N-th batch paying for B of them (the p95 spike of the full refresh). The start, scene cuts
and the batch after a mid-batch cut still refresh every slot. With ``graph`` (CUDA), a staggered
refresh (flow upload, warp, the cond CNNs of all hooks as a few GEMMs, :mod:`streamedit.temporal.cond`,
and the in-place row writes) replays from one CUDA graph: it sits on the main stream's critical path.
"""

from __future__ import annotations

import functools
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from ..accel.graphs import StaticGraph
from ..config import TemporalOptions
from .adapter import FLOW_CONVENTIONS

FARNEBACK = dict(pyr_scale=0.5, levels=3, winsize=15, iterations=3, poly_n=5, poly_sigma=1.2, flags=0)


def farneback(target: np.ndarray, source: np.ndarray, size: int | None = None) -> np.ndarray:
    """Flow (H,W,2) on ``target``'s grid pointing into ``source`` (RGB uint8), optionally computed with the
    long side reduced to ``size`` (the aspect kept) and brought back to full resolution."""
    h, w = target.shape[:2]
    a, b = (cv2.cvtColor(f, cv2.COLOR_RGB2GRAY) for f in (target, source))
    if size and size < max(h, w):
        small = (max(1, round(w * size / max(h, w))), max(1, round(h * size / max(h, w))))
        a, b = (cv2.resize(g, small, interpolation=cv2.INTER_AREA) for g in (a, b))
    flow = cv2.calcOpticalFlowFarneback(a, b, None, **FARNEBACK)
    if flow.shape[:2] != (h, w):  # back to full resolution, vectors rescaled with the grid
        scale = np.array([w / flow.shape[1], h / flow.shape[0]], np.float32)
        flow = cv2.resize(flow, (w, h), interpolation=cv2.INTER_LINEAR) * scale
    return flow


def cond_flow(frame: np.ndarray, prev: np.ndarray, size: int | None = None,
              convention: str = "backward") -> np.ndarray:
    """The displacement D (H,W,2) with ``cond(x) = out_prev(x + D(x))`` for input ``frame`` after input
    ``prev``, in the adapter's flow ``convention`` (module docstring)."""
    if convention == "forward":
        return np.negative(farneback(prev, frame, size))
    if convention != "backward":
        raise ValueError(f"unknown flow convention {convention!r} (one of {FLOW_CONVENTIONS})")
    return farneback(frame, prev, size)


def warp_output(prev: torch.Tensor, flows: torch.Tensor) -> torch.Tensor:
    """A (3,H,W) uint8 output warped by each of (n,H,W,2) flows: (n,3,H,W) float32 holding the uint8
    values (rounded, clamped to [0, 255])."""
    flows = flows.to(prev.device, non_blocking=True)
    images = prev.float().unsqueeze(0).expand(len(flows), -1, -1, -1)
    return warp(images, flows).round_().clamp_(0, 255)


@functools.cache
def _identity_grid(h: int, w: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """grid_sample's coordinates of each pixel (align_corners) and the pixel -> coordinate scale."""
    scale = torch.tensor([2.0 / max(w - 1, 1), 2.0 / max(h - 1, 1)], device=device)
    ys, xs = torch.meshgrid(torch.arange(h, device=device), torch.arange(w, device=device), indexing="ij")
    return torch.stack([xs, ys], dim=-1) * scale - 1.0, scale


def warp(images: torch.Tensor, flows: torch.Tensor) -> torch.Tensor:
    """Backward-warp (B,C,H,W) images with (B,H,W,2) pixel flows: out(x) = images(x + flow(x))."""
    base, scale = _identity_grid(images.shape[2], images.shape[3], flows.device)
    grid = torch.addcmul(base, flows, scale).to(images.dtype)  # one kernel: a refresh is latency-bound
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=True)


class SceneCutDetector:
    """Hard cuts from the L1 distance of normalised luma histograms of consecutive frames.

    Cheap (a 64x64 thumbnail per frame). ``threshold`` is the histogram L1 distance in [0, 2]
    above which frames count as different shots; 0.6 ignores motion, flashes of moderate size and
    slow fades, and catches cuts between different scenes.
    """

    def __init__(self, threshold: float = 0.6, bins: int = 32):
        self.threshold, self.bins = threshold, bins
        self._prev = None

    def histogram(self, frame: np.ndarray) -> np.ndarray:
        """The frame's normalised luma histogram (stateless: any thread may compute it ahead of update())."""
        thumb = cv2.resize(cv2.cvtColor(frame, cv2.COLOR_RGB2GRAY), (64, 64), interpolation=cv2.INTER_AREA)
        hist = np.bincount(((thumb.astype(np.int32) * self.bins) // 256).ravel(), minlength=self.bins).astype(np.float32)
        return hist / hist.sum()

    def reset(self) -> None:
        """The next frame starts no shot (no previous frame)."""
        self._prev = None

    def update(self, frame: np.ndarray, hist: np.ndarray | None = None) -> bool:
        """Whether ``frame`` starts a new shot after the last updated frame; ``hist``: its :meth:`histogram`
        when already computed."""
        hist = self.histogram(frame) if hist is None else hist
        cut = self._prev is not None and float(np.abs(hist - self._prev).sum()) > self.threshold
        self._prev = hist
        return cut


@dataclass
class Early:
    """What a frame starts when it is submitted, before its batch (a multi-stream engine's stream): its
    scene-cut histogram and, when its batch is due for a refresh, its flow against ``prev`` (a Future)."""

    prev: np.ndarray | None
    flow: Future | None
    hist: np.ndarray | None

    def cancel(self) -> None:
        if self.flow is not None:
            self.flow.cancel()


@dataclass
class CondPlan:
    """What the main stream does for one batch (made in the prefetch thread)."""

    refresh: bool
    reason: str = ""  # start / schedule / cut / after_cut / motion / stagger
    cut_at: int | None = None  # index in the batch of the first frame of a new shot
    flows: list[Future] = field(default_factory=list)  # one per frame before the cut (refresh only)
    force_te: bool = False
    slots: tuple[int, ...] | None = None  # staggered refresh: only these batch rows (flows: one per slot)


class TemporalConditioner:
    def __init__(self, adapter, refresh_every: int = 8, cut_refresh: bool = True,
                 motion_threshold: float | None = None, flow_size: int | None = None, workers: int = 4,
                 stagger: bool = False, graph: bool = False, pool: ThreadPoolExecutor | None = None):
        """``pool``: run the flows on this executor (shared by many conditioners, closed by its owner)."""
        self.adapter = adapter
        self.refresh_every = refresh_every
        self.stagger = stagger
        self._graphs = {} if graph else None  # (function, row count) -> StaticGraph (see _run)
        self._rows = {}  # slots -> device index tensor (made once per pattern)
        self.cuts = SceneCutDetector() if cut_refresh else None
        self.motion_threshold = motion_threshold
        self.flow_size = flow_size
        self.convention = getattr(getattr(adapter, "config", None), "flow", "backward")
        self._own_pool = pool is None
        self._pool = pool or ThreadPoolExecutor(workers, thread_name_prefix="streamedit-flow")
        self._start_run()
        self.early_flows = 0  # refresh flows that plan() took from early() (started before the batch)

    @classmethod
    def from_options(cls, adapter, options: TemporalOptions, graph: bool = False,
                     **kwargs) -> TemporalConditioner:
        """From the engine's temporal options (``EngineConfig.temporal``); ``kwargs`` override them."""
        kwargs = dict(stagger=options.cond_stagger, graph=graph) | kwargs
        return cls(adapter, options.cond_refresh_every, options.cut_refresh, options.motion_refresh,
                   options.flow_size, **kwargs)

    # ---- prefetch thread ----------------------------------------------------------------
    def early(self, frame: np.ndarray) -> Early | None:
        """For a caller whose next batch is this one frame (a multi-stream engine's stream, when the frame is
        submitted): its scene-cut histogram, and if that batch is due for a refresh by schedule or after a
        cut, its flow, started now, so the batch's launch waits for neither. For :meth:`plan`'s ``early``
        (None: nothing to start). It may run on another thread than plan(): a guess from stale state is
        only wasted or missed work, since plan() checks the previous frame."""
        hist = self.cuts.histogram(frame) if self.cuts is not None else None
        prev, flow = self._prev_last, None
        if prev is not None and not self.stagger and (self._after_cut or self._since_refresh + 1 >= self.refresh_every):
            flow = self._flow(frame, prev)
        return Early(prev, flow, hist) if flow is not None or hist is not None else None

    def plan(self, frames: list[np.ndarray], count: int, early: Early | None = None) -> CondPlan:
        """What the batch ``frames[:count]`` does with the cond embedding (its flows queued on the pool);
        ``early``: :meth:`early`'s for ``frames[0]`` when the batch is that frame alone."""
        cut_at = None
        first_hist = early.hist if early is not None and count == 1 else None
        if self.cuts is not None:
            for i, frame in enumerate(frames[:count]):
                if self.cuts.update(frame, first_hist if i == 0 else None) and cut_at is None:
                    cut_at = i
        if self.motion_threshold is not None and self._prev_last is not None:
            flow = farneback(frames[count - 1], self._prev_last, size=64)
            self._motion += float(np.linalg.norm(flow, axis=-1).mean())
        self._batch += 1
        if self._prev_last is None:
            plan = CondPlan(True, "start")
        elif cut_at is not None:
            plan = CondPlan(True, "cut", cut_at=cut_at, force_te=True)
        elif self._after_cut:
            plan = CondPlan(True, "after_cut", force_te=True)
        elif not self.stagger and self._since_refresh + 1 >= self.refresh_every:
            plan = CondPlan(True, "schedule")
        elif self.motion_threshold is not None and self._motion > self.motion_threshold:
            plan = CondPlan(True, "motion")
        elif self.stagger:
            slots = tuple(j for j in range(len(frames)) if (self._batch - j) % self.refresh_every == 0)
            plan = CondPlan(True, "stagger", slots=slots) if slots else CondPlan(False)
        else:
            plan = CondPlan(False)
        if plan.slots is not None:
            plan.flows = [self._flow(frames[j], self._prev_last) for j in plan.slots]
        elif plan.refresh:
            self._since_refresh, self._motion = 0, 0.0
            if self._prev_last is not None:
                stop = len(frames) if plan.cut_at is None else plan.cut_at
                if early is not None and early.flow is not None and early.prev is self._prev_last and count == stop == 1:
                    plan.flows = [early.flow]
                    early.flow = None
                    self.early_flows += 1
                else:
                    plan.flows = [self._flow(f, self._prev_last) for f in frames[:stop]]
        else:
            self._since_refresh += 1
        self._after_cut = bool(cut_at)  # slot 0: every row already holds a new-shot input frame
        self._prev_last = frames[count - 1]
        if early is not None:  # a flow started for nothing (no refresh after all, or another previous frame)
            early.cancel()
        return plan

    def _flow(self, frame: np.ndarray, prev: np.ndarray) -> Future:
        """The cond flow of ``frame`` after ``prev``, queued on the pool ((flow, cpu ms) when done)."""
        return self._pool.submit(_timed, cond_flow, frame, prev, self.flow_size, self.convention)

    # ---- main stream ----------------------------------------------------------------------
    def apply(self, plan: CondPlan, inputs: torch.Tensor, timings: dict) -> None:
        """Write the cond embedding for this batch; ``inputs`` are the (B,H,W,3) uint8 source frames."""
        if not plan.refresh:
            return
        if plan.slots is not None:  # staggered: the previous output warped onto the slots' frames, one graph
            self._run(self._warp_into_rows, (self._flows(plan, timings), self._prev_output), plan.slots)
            return
        cond = self.cond_images(plan, inputs, timings)
        if self._graphs is not None and len(cond) == self.adapter.rows:
            self._run(self.adapter.set_cond_rows, (cond,), tuple(range(len(cond))))
        else:
            self.adapter.set_cond_image(cond)

    def cond_images(self, plan: CondPlan, inputs: torch.Tensor, timings: dict) -> torch.Tensor:
        """A refresh's (B,3,H,W) uint8 cond images (not staggered): the previous output warped onto the
        frames before a cut, the input frames themselves from the cut (and at the start)."""
        cond = inputs.permute(0, 3, 1, 2)
        if plan.flows and self._prev_output is not None:
            warped = warp_output(self._prev_output, self._flows(plan, timings)).to(torch.uint8)
            cond = torch.cat([warped, cond[len(warped):]]) if len(warped) < len(cond) else warped
        return cond

    def _warp_into_rows(self, flows: torch.Tensor, prev: torch.Tensor, rows: torch.Tensor) -> None:
        self.adapter.set_cond_rows(warp_output(prev, flows).div_(127.5).sub_(1.0), rows)  # = uint8 -> [-1, 1]

    def _flows(self, plan: CondPlan, timings: dict) -> torch.Tensor:
        """(n,H,W,2) float32 flows of the plan (waited for here), on the host (pinned on CUDA)."""
        t0 = time.perf_counter()
        results = [f.result() for f in plan.flows]
        timings["flow_wait"] = 1e3 * (time.perf_counter() - t0)
        timings["flow_cpu"] = sum(ms for _, ms in results)
        flows = torch.from_numpy(np.stack([flow for flow, _ in results]))
        return flows.pin_memory() if self._prev_output.device.type == "cuda" else flows

    def _run(self, fn, inputs: tuple, slots: tuple[int, ...]) -> None:
        """``fn(*inputs, rows)`` for these batch slots, replayed from a CUDA graph (one per function and
        row count) when graphs are on: a refresh is many small kernels, latency-bound."""
        if slots not in self._rows:
            self._rows[slots] = torch.tensor(slots, device=next(self.adapter.parameters()).device)
        rows = self._rows[slots]
        if self._graphs is None:
            fn(*inputs, rows)
            return

        key = (fn.__name__, len(slots))
        if key not in self._graphs:
            self._graphs[key] = StaticGraph(fn, rows.device, name="cond")
        else:
            self.adapter.sync_cond_weights()  # a replay reads the packed weights without running Python
        self._graphs[key](*inputs, rows)

    def restart(self) -> None:
        """Forget the stream so far: the next batch plans as a first one ("start": every row's cond from its
        input frame, overwriting what the adapter's buffers held)."""
        self._start_run()

    def _start_run(self) -> None:
        """The per-stream state, as a new conditioner starts it and restart() starts it again."""
        self._batch, self._since_refresh, self._motion = -1, 0, 0.0
        self._after_cut = False  # the last batch had a cut after slot 0: refresh this one (module docstring)
        self._prev_last = None  # last input frame of the previous batch
        self._prev_output = None  # last decoded output of the previous batch (device, (3,H,W) uint8)
        if self.cuts is not None:
            self.cuts.reset()

    def remember(self, outputs: torch.Tensor, count: int) -> None:
        """Keep the last real decoded frame of this batch (device tensor) for the next refresh."""
        self._prev_output = outputs[count - 1].permute(2, 0, 1)

    def close(self) -> None:
        """Cancel queued flows and wait for the running ones (host work only); a shared pool stays open."""
        if self._own_pool:
            self._pool.shutdown(wait=True, cancel_futures=True)

    def release(self) -> None:
        """Drop the refresh graphs (their pools go with them), then the device tensors they read."""
        for graph in (self._graphs or {}).values():
            graph.release()
        if self._graphs is not None:
            self._graphs.clear()
        self._rows.clear()
        self._prev_output = None


def _timed(fn, *args):
    t0 = time.perf_counter()
    out = fn(*args)
    return out, 1e3 * (time.perf_counter() - t0)
