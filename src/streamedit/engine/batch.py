"""What travels between the engine's stages: a :class:`Batch` goes host (prefetch thread) -> side stream
-> main stream -> host, and carries the :class:`DeviceBatch` the side stream hands the main stream."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from ..telemetry import BatchRecord
from ..temporal.conditioner import CondPlan


@dataclass
class DeviceBatch:
    """The side stream's outputs for one batch, read by the main stream after ``done``."""
    noise: torch.Tensor  # (B, C, h/8, w/8) starting noise
    source: torch.Tensor  # (B, C, h/8, w/8) source latents
    embeds: torch.Tensor  # (B, tokens, hidden) prompt embeddings
    mask: torch.Tensor | None  # (B, tokens) for the padded TE view (te_size 256); None: unpadded
    frames: torch.Tensor  # (B, H, W, 3) uint8 source frames on the device (the adapter's cond input)
    done: torch.cuda.Event | None  # recorded on the side stream after all of it; None: one stream

    @property
    def text(self) -> tuple[torch.Tensor, ...]:
        """The U-Net's text inputs: the embeddings, and the mask where there is one."""
        return (self.embeds,) if self.mask is None else (self.embeds, self.mask)


@dataclass
class Batch:
    index: int
    frames: list[np.ndarray]  # HxWx3 uint8 at the working size, padded to batch_size
    count: int  # real frames (the rest is padding)
    host_frames: torch.Tensor | None = None  # (B,H,W,3) uint8, pinned on CUDA; None: not prepared
    images: object = None  # the text encoder's inputs (TextEncoder.prepare_images)
    plan: CondPlan | None = None  # the temporal conditioner's plan for this batch
    thumbs: list | None = None  # similarity thumbnails of the real frames (skip_similar)
    skip: list[bool] | None = None  # per real frame: re-emit the last output instead
    record: BatchRecord | None = None  # this batch's entry in batch_log (set when it is encoded)
    keep: list = field(default_factory=list)  # host tensors that must outlive async copies
    device: DeviceBatch | None = None  # between the two streams; None: nothing launched (all skipped)
    events: dict[str, torch.cuda.Event | None] = field(default_factory=dict)  # profile events (telemetry.SPANS)
    output: torch.Tensor | None = None  # (B,H,W,3) uint8 on the host
    ready: torch.cuda.Event | None = None  # the output's copy to the host is done
    probe: dict | None = None  # engine.probe is recording this batch: noise, embeds, mask, latents (probe.py)
