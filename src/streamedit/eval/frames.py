"""Clips as float tensors on a device, in chunks: what every metric (basic and optional) reads."""

from __future__ import annotations

import warnings

import cv2
import numpy as np
import torch

from ..errors import StreameditError

LUMA = (0.299, 0.587, 0.114)  # ITU-R BT.601, the weights of cv2.COLOR_RGB2GRAY


CHUNK = 16  # frames moved to the device at a time


BASE_METRICS = ("warp_error", "sobel", "hf_fft")


# ---------------------------------------------------------------------------------------------- frames
def as_frames(frames) -> torch.Tensor:
    """(T,3,H,W) tensor, uint8 or float32 as given, on the device it came on (no float copy of uint8)."""
    if isinstance(frames, (list, tuple)):
        if not frames:
            raise StreameditError("empty frame list")
        if isinstance(frames[0], torch.Tensor):
            x = torch.stack(list(frames))
        else:  # numpy arrays or PIL images
            x = torch.from_numpy(np.stack([np.asarray(f) for f in frames]))
    elif isinstance(frames, np.ndarray):
        with warnings.catch_warnings():  # read-only arrays (decoded video) are fine: nothing writes to them
            warnings.simplefilter("ignore", UserWarning)
            x = torch.from_numpy(frames)
    elif isinstance(frames, torch.Tensor):
        x = frames
    else:
        raise StreameditError(f"unsupported frame container: {type(frames).__name__}")
    if x.ndim != 4:
        raise StreameditError(f"frames must be (T,H,W,3) or (T,3,H,W), got shape {tuple(x.shape)}")
    if x.shape[-1] == 3 and x.shape[1] != 3:
        x = x.permute(0, 3, 1, 2)
    elif x.shape[1] != 3:
        raise StreameditError(f"frames must have 3 (RGB) channels, got shape {tuple(x.shape)}")
    return x if x.dtype in (torch.uint8, torch.float32) else x.float()


def _float(x: torch.Tensor, device) -> torch.Tensor:
    x = x.to(device)
    return x.float() / 255.0 if x.dtype == torch.uint8 else x.float()


def _gray(x: torch.Tensor) -> torch.Tensor:
    """(N,3,H,W) float -> (N,1,H,W) luma."""
    w = torch.tensor(LUMA, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    return (x * w).sum(1, keepdim=True)


def _gray_u8(frame: torch.Tensor) -> np.ndarray:
    """One (3,H,W) frame -> HxW uint8 luma for OpenCV."""
    if frame.dtype != torch.uint8:
        frame = (frame.float().clamp(0, 1) * 255).round().to(torch.uint8)
    return cv2.cvtColor(np.ascontiguousarray(frame.permute(1, 2, 0).cpu().numpy()), cv2.COLOR_RGB2GRAY)


def _device(device, *clips) -> torch.device:
    if device is not None:
        return torch.device(device)
    for c in clips:  # follow the data: a CUDA tensor keeps the work on its GPU
        if isinstance(c, torch.Tensor) and c.is_cuda:
            return c.device
    return torch.device("cpu")


def _chunks(n: int, size: int = CHUNK):
    return [(a, min(a + size, n)) for a in range(0, n, size)]
