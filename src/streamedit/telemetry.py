"""What the engine measures and how runs are identified: one typed record per batch
(:class:`BatchRecord`, ``StreamEngine.batch_log``), running totals (:class:`EngineStats`), the spans of
the per-batch CUDA-event timings and their table order, the device name, strict JSON lines."""

from __future__ import annotations

import dataclasses
import json
import platform
from dataclasses import dataclass, field
from typing import Literal, NamedTuple

import numpy as np


class Span(NamedTuple):
    """A per-batch CUDA-event timing: ``name`` is the time from event ``start`` to event ``end``."""
    name: str
    start: str
    end: str


# unet_decode: the fused graph (U-Net + VAE decode, not separable by events); wait_side: the main stream
# waiting for the side stream's event; d2h: the outputs' copy to the host
SPANS = (Span("te", "te0", "te1"), Span("vae_encode", "te1", "enc1"), Span("cond", "cond0", "unet0"),
         Span("unet", "unet0", "unet1"), Span("vae_decode", "unet1", "dec1"), Span("unet_decode", "unet0", "dec1"),
         Span("wait_side", "main0", "cond0"), Span("d2h", "dec1", "out1"))
# host-side timings of a refresh batch (temporal/conditioner.py): waiting for the flows, their CPU time
HOST_TIMINGS = ("flow_wait", "flow_cpu")
# the bench table's order of components
COMPONENTS = tuple(s.name for s in SPANS if s.name not in ("wait_side", "d2h")) + HOST_TIMINGS


@dataclass
class BatchRecord:
    """One batch as the engine ran it (``StreamEngine.batch_log``)."""
    batch: int  # index in the stream
    frames: int  # real frames (the rest of the batch is padding)
    prompt: str
    t_launch: float  # perf_counter when its side-stream work was queued
    skipped: int = 0  # frames that re-emitted the last output (skip_similar)
    te: Literal["computed", "reused", "skipped"] = "computed"
    cond: str | None = None  # the adapter's cond embedding: a refresh reason (CondPlan.reason) or "reuse"
    cut_at: int | None = None  # frame of a scene cut in this batch
    t_done: float | None = None  # perf_counter when its outputs were on the host
    ms: dict[str, float] | None = None  # CUDA-event spans (SPANS names); with EngineConfig.profile on CUDA
    host_ms: dict[str, float] = field(default_factory=dict)  # HOST_TIMINGS names

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class TickRecord:
    """One batch of the multi-stream engine (``MultiStreamEngine.tick_log``): which stream sat in which row."""
    tick: int
    shape: tuple[int, int]  # the working (h, w) of its size group
    streams: tuple[int | None, ...]  # batch row -> stream id; None: a padding row (len: the bucket)
    prompts: tuple[str | None, ...]  # batch row -> the prompt it was encoded with
    t_launch: float  # perf_counter when its work was queued
    t_done: float | None = None  # perf_counter when its outputs were on the host
    launch_ms: float | None = None  # host time to prepare and queue it (flows waited for included)
    wait_ms: float | None = None  # host time blocked on its outputs in _finish
    te_calls: int = 0  # text-encoder calls it made (1 when its prompts share one call)
    cond_rows: int = 0  # adapter rows whose cond embedding it rewrote (refresh, or a stream changed row)
    cond_embedded: int = 0  # of those, the refreshed streams' (the cond CNN ran); the rest were copies
    phases_ms: dict[str, float] = field(default_factory=dict)  # launch_ms by part, in order (multi.py _launch)


@dataclass
class EngineStats:
    """Running totals of an engine (``StreamEngine.stats``)."""
    batches: int = 0
    frames: int = 0
    te_calls: int = 0
    te_frames: int = 0
    skipped_frames: int = 0
    skipped_batches: int = 0


def device_name(device) -> str:
    import torch

    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def finite(obj):
    """NaN/inf -> None, recursively: strict JSON (jq, browsers) has no NaN."""
    if isinstance(obj, float):
        return obj if np.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite(v) for k, v in obj.items()}
    return [finite(v) for v in obj] if isinstance(obj, (list, tuple)) else obj


def dumps(obj) -> str:
    """One strict-JSON line; objects such as an adapter in a config are written as their class name."""
    return json.dumps(finite(obj), default=lambda o: type(o).__name__)
