"""What ``train lllite`` adds for generalisation (issue 29): stale cond images as the runtime makes them,
and geometric augmentation of whole pairs.

**Stale cond** (``--stale-cond R``). The runtime (:class:`streamedit.temporal.conditioner.TemporalConditioner`)
builds the cond image of batch slot ``j`` only on refresh batches, from the last output of the batch before,
warped onto the slot's frame, and then reuses that embedding for up to ``R`` batches. So at run time frame
``t`` (slot ``j`` of a batch ``m`` batches after the last refresh, runtime batch size ``B``) is conditioned on

    cond = warp(out[s], D(x[a], x[s]))   with  a = t - B*m,  s = a - j - 1,

the previous output moved onto frame ``a``, an older frame than ``t``; from a shot's first frame on (``s``
before the shot starts) it is the input frame ``x[a]`` itself. A cut refreshes its batch, and a cut after
slot 0 the next batch too, so an age ``m >= 1`` has its whole refresh batch (``a - j`` on) inside ``t``'s
shot. The stored pairs hold only the fresh case (``m = 0, j = 0``). :class:`StaleCond` draws, per example,
a refresh interval ``N`` from 1..R, an age ``m`` from 0..N-1 (cut to what the runtime can reach:
:meth:`StaleCond.max_age`) and a slot ``j`` from 0..B-1, and builds that cond with the runtime's own functions
(:func:`~streamedit.temporal.conditioner.cond_flow` in the adapter's flow convention, ``flow_size``, and
:func:`~streamedit.temporal.conditioner.warp_output`), from the teacher frames (the base model's outputs).

**Augmentation** (``--augment``): one random similarity transform per example (zoom in by up to
``1/zoom_min``, shift within the frame, rotation up to ``rotate`` degrees, horizontal flip with p 0.5),
applied alike to source, cond and target, so a pair stays a pair: the cond is still the previous output
moved onto the (transformed) source.
"""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
import torch.nn.functional as F


def encode_latents(denoiser, frames_u8: torch.Tensor, clean: bool, chunk: int = 32) -> torch.Tensor:
    """(N,H,W,3) uint8 -> latents on the model's device: raw source latents, or (``clean``) the
    flow-matching clean latents that ``denoiser.decode`` turns back into the image."""
    device = denoiser.models.device
    out = []
    for i in range(0, len(frames_u8), chunk):
        z = denoiser.encode_source(frames_u8[i:i + chunk].to(device))
        out.append((z - denoiser.shift) * denoiser.scaling if clean else z)
    return torch.cat(out)


class StaleCond:
    """Cond images of a :class:`~streamedit.train.lllite.PairSet` at random refresh ages (module docstring)."""

    def __init__(self, data, refresh_max: int, runtime_batch: int = 4, flow_size: int | None = None,
                 convention: str = "backward", workers: int = 8):
        if data.teacher is None or data.clip is None:
            raise ValueError("stale cond needs the pairs' teacher frames and clip layout")
        self.data, self.refresh_max, self.batch = data, refresh_max, runtime_batch
        self.flow_size, self.convention = flow_size, convention
        self.pool = ThreadPoolExecutor(workers, thread_name_prefix="stale-cond")
        # first frame of the shot each frame belongs to (global index): pairs mark shot starts
        shot = np.zeros(len(data.source), np.int64)
        first = 0
        for i, (c, s) in enumerate(zip(data.clip.tolist(), data.start.tolist())):
            if s or i == 0 or c != data.clip[i - 1]:
                first = i
            shot[i] = first
        self.shot_start = shot

    def max_age(self, t: int, slot: int) -> int:
        """The oldest refresh the runtime can leave frame ``t`` in ``slot`` on: its batch's own (0), or one
        whose whole batch lies in ``t``'s shot (a cut refreshes its batch and, after slot 0, the next one)."""
        return max(0, (t - slot - int(self.shot_start[t])) // self.batch)

    def draw(self, idx: torch.Tensor, gen: torch.Generator) -> tuple[list[int], list[int]]:
        """(ages m, slots j) for the examples ``idx``: N ~ U{1..R}, m ~ U{0..N-1}, j ~ U{0..B-1}; m is cut to
        :meth:`max_age` (the refresh that made the cond lies in the example's shot, as at run time)."""
        n = len(idx)
        interval = torch.randint(1, self.refresh_max + 1, (n,), generator=gen)
        ages = (torch.rand(n, generator=gen) * interval).long().tolist()
        slots = torch.randint(self.batch, (n,), generator=gen).tolist()
        ages = [min(m, self.max_age(int(t), j)) for m, t, j in zip(ages, idx.tolist(), slots)]
        return ages, slots

    def cond_for(self, t: int, age: int, slot: int) -> np.ndarray:
        """(H,W,3) uint8: the runtime's cond image for frame ``t`` ``age`` batches after a refresh, in ``slot``."""
        from ..temporal.conditioner import cond_flow, warp_output

        a = t - self.batch * age
        s = a - slot - 1
        if a < self.shot_start[t]:
            raise ValueError(f"frame {t}: refresh frame {a} lies before its shot")
        if s < self.shot_start[t]:
            return self.data.source[a].numpy()
        src = self.data.source
        flow = cond_flow(src[a].numpy(), src[s].numpy(), self.flow_size, self.convention)
        prev = self.data.teacher[s].permute(2, 0, 1)
        return warp_output(prev, torch.from_numpy(flow)[None])[0].to(torch.uint8).permute(1, 2, 0).numpy()

    def sample(self, idx: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, list[int], list[int]]:
        """(n,H,W,3) uint8 cond images for ``idx`` (flows on the thread pool: OpenCV releases the GIL)."""
        ages, slots = self.draw(idx, gen)
        conds = list(self.pool.map(self.cond_for, idx.tolist(), ages, slots))
        return torch.from_numpy(np.stack(conds)), ages, slots

    def close(self) -> None:
        self.pool.shutdown(wait=True)


def random_transforms(n: int, gen: torch.Generator, zoom_min: float = 0.6, rotate: float = 8.0,
                      flip: bool = True) -> torch.Tensor:
    """(n,2,3) affine_grid matrices (output -> input coordinates in [-1, 1]) of random similarity transforms
    that stay inside the frame (corners of the sampled square within [-1, 1] at any rotation)."""
    u = torch.rand(n, 5, generator=gen)
    scale = zoom_min + (1 - zoom_min) * u[:, 0]  # the sampled square's side, in frame widths
    angle = (2 * u[:, 1] - 1) * math.radians(rotate)
    # a rotated square of side `scale` spans scale * (|cos| + |sin|): shrink it so it still fits
    scale = scale / torch.clamp(angle.cos().abs() + angle.sin().abs(), min=1.0)
    room = 1 - scale * (angle.cos().abs() + angle.sin().abs())
    tx, ty = (2 * u[:, 2] - 1) * room, (2 * u[:, 3] - 1) * room
    sx = torch.where((u[:, 4] < 0.5) & flip, -scale, scale)
    cos, sin = angle.cos(), angle.sin()
    return torch.stack([torch.stack([sx * cos, -scale * sin, tx], 1), torch.stack([sx * sin, scale * cos, ty], 1)], 1)


def augment(images: list[torch.Tensor], theta: torch.Tensor) -> list[torch.Tensor]:
    """Each (n,H,W,3) uint8 tensor resampled through ``theta`` (bilinear, same transform per example across
    the list); uint8 out, on the input's device."""
    x = images[0]
    grid = F.affine_grid(theta.to(x.device), (x.shape[0], 3, x.shape[1], x.shape[2]), align_corners=False)
    out = []
    for im in images:
        y = F.grid_sample(im.permute(0, 3, 1, 2).float(), grid, mode="bilinear", padding_mode="border",
                          align_corners=False)
        out.append(y.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous())
    return out


class PairViews:
    """What one micro-batch trains on: (cond images (n,3,H,W) on the device, source latents, clean target
    latents (float), target images (n,H,W,3) uint8 for the pixel loss or None). Plain: the stored conds and
    latents encoded once up front (the frozen VAE is deterministic). With ``stale`` the conds are drawn per
    batch; with ``augment`` every view is transformed per batch and the latents are encoded per batch."""

    def __init__(self, denoiser, data, pixel: bool, stale: StaleCond | None = None, augment: bool = False,
                 zoom_min: float = 0.6, rotate: float = 8.0):

        self.denoiser, self.data, self.pixel, self.stale = denoiser, data, pixel, stale
        self.augment, self.zoom_min, self.rotate = augment, zoom_min, rotate
        self.device = denoiser.models.device
        if augment:
            self.src_lat = self.tgt_lat = None
            self.latent_shape = tuple(encode_latents(denoiser, data.source[:1], clean=False).shape[1:])
        else:
            self.src_lat = encode_latents(denoiser, data.source, clean=False)
            self.tgt_lat = encode_latents(denoiser, data.target, clean=True)
            self.latent_shape = tuple(self.src_lat.shape[1:])
            if not pixel:
                data.target = None  # only its latents are used from here on: free the host copy

    def __call__(self, idx: torch.Tensor, gen: torch.Generator):

        cond = self.stale.sample(idx, gen)[0] if self.stale is not None else self.data.cond[idx]
        if not self.augment:
            rows = idx.to(self.device)
            target = self.data.target[idx] if self.pixel else None
            return (cond.permute(0, 3, 1, 2).to(self.device, non_blocking=True), self.src_lat[rows],
                    self.tgt_lat[rows].float(), target)
        theta = random_transforms(len(idx), gen, self.zoom_min, self.rotate)
        views = [x.to(self.device, non_blocking=True) for x in (self.data.source[idx], cond, self.data.target[idx])]
        source, cond, target = augment(views, theta)
        src = encode_latents(self.denoiser, source, clean=False)
        z0 = encode_latents(self.denoiser, target, clean=True).float()
        return cond.permute(0, 3, 1, 2), src, z0, target if self.pixel else None
