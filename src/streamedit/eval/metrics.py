"""Quality metrics for stylized video: warp error (temporal consistency), Sobel and HF-FFT (sharpness).

Frames may be a list of HxWx3 uint8 RGB arrays (or PIL images / tensors), a (T,H,W,3) uint8 array or
tensor, or a float array/tensor in [0,1] laid out (T,H,W,3) or (T,3,H,W). All arithmetic runs in torch on
``device`` (CPU or CUDA), chunk by chunk, so a long clip never sits on the GPU as float32 all at once.
Intensities are always in [0,1]. Formulas, scales and pitfalls: ``docs/metrics.md``.
"""

from __future__ import annotations

import math
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from ..errors import StreameditError
from . import optional
from .frames import _chunks, _device, _float, _gray, _gray_u8, as_frames
from .optional import load_raft, raft_flows

# OpenCV Farnebäck parameters (the values of OpenCV's own sample): 3-level pyramid halving each level,
# 15x15 averaging window, 3 iterations per level, 5-pixel polynomial neighbourhood with sigma 1.2.
FARNEBACK = dict(pyr_scale=0.5, levels=3, winsize=15, iterations=3, poly_n=5, poly_sigma=1.2, flags=0)
HF_RADIUS = 0.25  # HF-FFT disc radius as a fraction of the Nyquist frequency (0.5 cycles/pixel)


# ------------------------------------------------------------------------------------ flow and warping
def warp(img: torch.Tensor, flow: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample ``img`` at x + flow(x) (bilinear). img (N,C,H,W), flow (N,2,H,W) in pixels (dx, dy).

    Returns the warped image and an (N,1,H,W) bool mask of positions that landed inside the frame.
    """
    n, _, h, w = flow.shape
    ys, xs = torch.meshgrid(torch.arange(h, device=flow.device, dtype=flow.dtype),
                            torch.arange(w, device=flow.device, dtype=flow.dtype), indexing="ij")
    x, y = xs + flow[:, 0], ys + flow[:, 1]
    grid = torch.stack((2 * x / max(w - 1, 1) - 1, 2 * y / max(h - 1, 1) - 1), dim=-1)
    out = F.grid_sample(img, grid, mode="bilinear", padding_mode="border", align_corners=True)
    inside = (x >= 0) & (x <= w - 1) & (y >= 0) & (y <= h - 1)
    return out, inside.unsqueeze(1)


def valid_mask(fw: torch.Tensor, bw: torch.Tensor, motion_boundaries: bool = True) -> torch.Tensor:
    """Non-occluded pixels of frame t, (N,H,W) bool, from fw = F_{t->t+1} (grid t), bw = F_{t+1->t} (grid t+1).

    Forward-backward check (Ruder et al. 2016, as in Lai et al. 2018), with b(x) = bw(x + fw(x)):
    occluded where |fw + b|^2 > 0.01 (|fw|^2 + |b|^2) + 0.5; with ``motion_boundaries`` also where
    |grad fw_x|^2 + |grad fw_y|^2 > 0.01 |fw|^2 + 0.002 (forward differences). Pixels whose x + fw(x)
    leaves the frame are invalid as well, since there is nothing to compare them with.
    """
    b, inside = warp(bw, fw)
    fw2, b2 = fw.pow(2).sum(1), b.pow(2).sum(1)
    ok = (fw + b).pow(2).sum(1) <= 0.01 * (fw2 + b2) + 0.5
    if motion_boundaries:
        g = torch.zeros_like(fw2)
        g[..., :, :-1] += (fw[..., :, :-1] - fw[..., :, 1:]).pow(2).sum(1)
        g[..., :-1, :] += (fw[..., :-1, :] - fw[..., 1:, :]).pow(2).sum(1)
        ok &= g <= 0.01 * fw2 + 0.002
    return ok & inside[:, 0]


@dataclass
class Flows:
    """Optical flow of an input clip, reusable across metrics.

    fw[t] is F_{t->t+1}: a (2,H,W) float32 field on frame t's pixel grid, in pixels (dx, dy), such that
    frame t at x shows what frame t+1 shows at x + fw[t](x). valid[t] (H,W bool) marks non-occluded,
    in-frame pixels of frame t (:func:`valid_mask`). Both live on the CPU; only chunks visit the GPU.
    """

    fw: torch.Tensor
    valid: torch.Tensor
    method: str = "farneback"

    def __len__(self) -> int:
        return self.fw.shape[0]

    def __getitem__(self, s: slice) -> Flows:
        return Flows(self.fw[s], self.valid[s], self.method)

    @property
    def valid_fraction(self) -> float:
        return float(self.valid.float().mean()) if len(self) else float("nan")


def _farneback_pair(gray: list[np.ndarray], t: int, params: dict) -> tuple[np.ndarray, np.ndarray]:
    fw = cv2.calcOpticalFlowFarneback(gray[t], gray[t + 1], None, **params)
    bw = cv2.calcOpticalFlowFarneback(gray[t + 1], gray[t], None, **params)
    return fw, bw


def compute_flows(inputs, method: str = "farneback", *, raft_weights=None, device=None,
                  motion_boundaries: bool = True, farneback: dict | None = None) -> Flows:
    """Forward flows and validity masks of consecutive *input* frames (see :class:`Flows`).

    method "farneback" (OpenCV, CPU, parameters :data:`FARNEBACK`, overridable through ``farneback``) on
    the BT.601 luma in uint8, or "raft" (torchvision raft_large from the local file ``raft_weights``).
    """
    x = as_frames(inputs)
    if len(x) < 2:
        raise StreameditError("flow needs at least 2 frames")
    dev = _device(device, inputs)
    if method == "farneback":
        params = {**FARNEBACK, **(farneback or {})}
        gray = [_gray_u8(f) for f in x]
        pool = ThreadPoolExecutor(min(8, os.cpu_count() or 1))  # OpenCV releases the GIL

        def pairs(a, b):
            res = list(pool.map(lambda t: _farneback_pair(gray, t, params), range(a, b)))
            return [torch.from_numpy(np.stack([r[i] for r in res])).permute(0, 3, 1, 2).to(dev) for i in (0, 1)]
    elif method == "raft":
        model = load_raft(raft_weights, dev)

        def pairs(a, b):
            return raft_flows(model, _float(x[a:b + 1], dev))
    else:
        raise StreameditError(f"unknown flow method {method!r} (farneback or raft)")
    fws, valids = [], []
    try:
        for a, b in _chunks(len(x) - 1):
            fw, bw = pairs(a, b)
            fws.append(fw.float().cpu())
            valids.append(valid_mask(fw.float(), bw.float(), motion_boundaries).cpu())
    finally:
        if method == "farneback":
            pool.shutdown()
    return Flows(torch.cat(fws), torch.cat(valids), method)


def _fit_flow(fw: torch.Tensor, valid: torch.Tensor, size) -> tuple[torch.Tensor, torch.Tensor]:
    """Resize flows (and rescale their vectors) when the outputs have another resolution than the inputs."""
    if tuple(fw.shape[-2:]) == tuple(size):
        return fw, valid
    h, w = fw.shape[-2:]
    fw = F.interpolate(fw, size=size, mode="bilinear", align_corners=False)
    fw = fw * torch.tensor([size[1] / w, size[0] / h], device=fw.device).view(1, 2, 1, 1)
    valid = F.interpolate(valid[:, None].float(), size=size, mode="nearest")[:, 0] > 0.5
    return fw, valid


# ----------------------------------------------------------------------------------------------- metrics
def warp_error(inputs, outputs, flow: str | Flows = "farneback", return_per_pair: bool = False, *,
               device=None, raft_weights=None):
    """Warp error E_warp of Lai et al. (ECCV 2018) for ``outputs``, with flow measured on ``inputs``.

    For each pair (t, t+1), with fw = F_{t->t+1} (input flow on frame t's grid) and M_t its validity
    mask (:func:`valid_mask`), O_{t+1} is warped back onto frame t by sampling it at x + fw(x):
    W_t(x) = O_{t+1}(x + fw(x)), and

        E_t = sum_x M_t(x) * mean_c (O_t(x,c) - W_t(x,c))^2  /  sum_x M_t(x)

    with intensities in [0,1]: raw units of intensity^2, *not* scaled by 1e3. mean_c averages the 3 RGB
    channels, as Lai et al.'s reference evaluation does (3x the per-pixel squared RGB norm of their Eq. 9).
    E_warp = mean_t E_t over pairs with at least one valid pixel (NaN if none). Lower is more temporally
    stable, but blur lowers it too: report :func:`sobel_sharpness` beside it.
    ``flow`` is "farneback", "raft" or a precomputed :class:`Flows` (then ``inputs`` may be None).
    With ``return_per_pair`` the per-pair array E_t is returned instead of the mean.
    """
    out = as_frames(outputs)
    flows = flow if isinstance(flow, Flows) else compute_flows(inputs, flow, raft_weights=raft_weights,
                                                                 device=device)
    if len(out) != len(flows) + 1:
        raise StreameditError(f"{len(out)} output frames but flow for {len(flows) + 1} input frames")
    dev = _device(device, outputs)
    per = []
    for a, b in _chunks(len(flows)):
        o = _float(out[a:b + 1], dev)
        fw, m = _fit_flow(flows.fw[a:b].to(dev), flows.valid[a:b].to(dev), o.shape[-2:])
        warped, _ = warp(o[1:], fw)
        sq = (o[:-1] - warped).pow(2).mean(1)
        n = m.sum((1, 2)).double()
        per.append(((sq * m).sum((1, 2)).double() / n).where(n > 0, float("nan")).cpu())
    per = torch.cat(per).numpy()
    return per if return_per_pair else _nanmean(per)


def _nanmean(v: np.ndarray) -> float:
    return float(np.nanmean(v)) if np.isfinite(v).any() else float("nan")


def _per_frame(frames, fn, device, return_per_frame: bool):
    x = as_frames(frames)
    dev = _device(device, frames)
    per = torch.cat([fn(_float(x[a:b], dev)).double().cpu() for a, b in _chunks(len(x))]).numpy()
    return per if return_per_frame else float(per.mean())


def _sobel(x: torch.Tensor) -> torch.Tensor:
    kx = torch.tensor([[-1.0, 0, 1], [-2, 0, 2], [-1, 0, 1]], device=x.device)
    g = F.conv2d(_gray(x), torch.stack((kx, kx.t()))[:, None])  # 'valid': no padding artefacts at borders
    return g.pow(2).sum(1).sqrt().mean((1, 2))


def sobel_sharpness(frames, *, device=None, return_per_frame: bool = False):
    """Mean Sobel gradient magnitude sqrt(Gx^2 + Gy^2) of the BT.601 luma in [0,1], per frame, averaged.

    Unnormalised 3x3 Sobel kernels ([-1 0 1; -2 0 2; -1 0 1] and its transpose) over the interior
    (H-2)x(W-2) pixels; a unit step edge scores 4 on the pixels it touches. Higher is sharper.
    """
    return _per_frame(frames, _sobel, device, return_per_frame)


def _hf_fraction(x: torch.Tensor, radius: float) -> torch.Tensor:
    g = _gray(x)[:, 0]
    g = g - g.mean((-2, -1), keepdim=True)  # drop DC so brightness does not dilute the fraction
    p = torch.fft.fft2(g).abs().pow(2)
    fy = torch.fft.fftfreq(g.shape[-2], device=g.device)[:, None]
    fx = torch.fft.fftfreq(g.shape[-1], device=g.device)[None, :]
    high = (fy.pow(2) + fx.pow(2)).sqrt() > radius * 0.5
    total = p.sum((-2, -1))
    flat = total <= 1e-12 * g.shape[-1] ** 2 * g.shape[-2] ** 2  # Parseval: luma std <= 1e-6, rounding noise
    return torch.where(flat, torch.zeros_like(total), (p * high).sum((-2, -1)) / total.clamp_min(1e-30))


def psnr_per_frame(outputs, references) -> np.ndarray:
    """PSNR (dB) of each uint8 output frame against its reference frame (identical frames: inf)."""
    a, b = (np.asarray(x, dtype=np.float64) for x in (outputs, references))
    if a.shape != b.shape:
        raise StreameditError(f"PSNR needs frames of the same shape, got {a.shape} and {b.shape}")
    mse = ((a - b) ** 2).reshape(len(a), -1).mean(axis=1)
    with np.errstate(divide="ignore"):
        return 10 * np.log10(255.0**2 / mse)


def hf_fft_energy(frames, radius: float = HF_RADIUS, *, device=None, return_per_frame: bool = False):
    """Fraction of the luma's 2-D FFT power (mean removed) above ``radius`` x Nyquist, per frame, averaged.

    Frequencies in cycles/pixel per axis (fftfreq), so the disc |f| <= radius * 0.5 is round in physical
    frequency for any aspect ratio; for a square NxN frame it is radius * N/2 FFT bins. No window: the
    periodic-boundary seam adds a little high-frequency power, the same for frames of one clip.
    Value in [0,1]; higher means more fine detail (or noise). A flat frame scores 0.
    """
    return _per_frame(frames, lambda x: _hf_fraction(x, radius), device, return_per_frame)


# ------------------------------------------------------------------------------------------ aggregation
def compute_all(inputs, outputs, prompt: str | None = None, *, lpips_weights=None, clip_model=None,
                raft_weights=None, flows: Flows | None = None, device=None) -> dict:
    """Every available metric as a flat dict of floats, plus ``skipped``: {metric: one-line reason}.

    ``*_input`` keys measure the source clip the same way, the reference a stylization is judged against.
    """
    flows = flows if flows is not None else compute_flows(inputs, device=device)
    res = {
        "warp_error": warp_error(None, outputs, flows, device=device),
        "warp_error_input": warp_error(None, inputs, flows, device=device),
        "warp_valid_fraction": flows.valid_fraction,
        "sobel": sobel_sharpness(outputs, device=device),
        "sobel_input": sobel_sharpness(inputs, device=device),
        "hf_fft": hf_fft_energy(outputs, device=device),
        "hf_fft_input": hf_fft_energy(inputs, device=device),
    }
    skipped = {}
    avail = optional.available_metrics(lpips_weights, clip_model, raft_weights)
    runs = {
        "lpips": lambda: optional.lpips_metrics(inputs, outputs, lpips_weights, device=device),
        "clip": lambda: optional.clip_metrics(inputs, outputs, prompt, clip_model, device=device),
        "raft": lambda: _raft_metrics(inputs, outputs, raft_weights, device),
    }
    for name, run in runs.items():
        ok, reason = avail[name]
        if ok:
            try:
                res.update(run())
            except StreameditError as e:  # unusable weights: report, keep the other metrics
                ok, reason = False, str(e).splitlines()[0]
        if not ok:
            skipped[name] = reason
    if avail["clip"][0] and prompt is None and "clip" not in skipped:
        skipped["clip_text"] = "no prompt given"
    res["skipped"] = skipped
    return res


def _raft_metrics(inputs, outputs, raft_weights, device) -> dict:
    flows = compute_flows(inputs, "raft", raft_weights=raft_weights, device=device)
    return {"warp_error_raft": warp_error(None, outputs, flows, device=device),
            "warp_error_input_raft": warp_error(None, inputs, flows, device=device),
            "warp_valid_fraction_raft": flows.valid_fraction}


def windowed(metric_fn, *clips, window: int = 64, **kwargs) -> dict:
    """Run ``metric_fn(*clip_slices, **kwargs)`` on consecutive non-overlapping windows of frames.

    Clips are sliced to frames [s, s+window); a :class:`Flows` keyword argument is sliced to the
    matching pairs. Pairs that straddle two windows are not counted; a last window of one frame is
    dropped. Returns {"starts", "values", "mean", "std"} (population std over windows): a drift report.
    """
    n = len(next(c for c in clips if c is not None))
    starts, values = [], []
    for s in range(0, n, window):
        e = min(s + window, n)
        if e - s < 2:
            continue
        kw = {k: (v[s:e - 1] if isinstance(v, Flows) else v) for k, v in kwargs.items()}
        starts.append(s)
        values.append(float(metric_fn(*(c[s:e] if c is not None else None for c in clips), **kw)))
    v = np.asarray(values, dtype=float)
    ok = v[np.isfinite(v)]
    return {"starts": starts, "values": values, "mean": float(ok.mean()) if ok.size else math.nan,
            "std": float(ok.std()) if ok.size else math.nan}
