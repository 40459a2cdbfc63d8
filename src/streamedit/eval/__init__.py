"""Video quality metrics: temporal consistency (warp error), sharpness (Sobel, HF-FFT) and optional
model metrics (LPIPS, CLIP, RAFT) that run only from local weights. See docs/metrics.md."""

from .frames import as_frames
from .metrics import (FARNEBACK, HF_RADIUS, Flows, compute_all, compute_flows, hf_fft_energy, psnr_per_frame,
                      sobel_sharpness, valid_mask, warp, warp_error, windowed)
from .optional import available_metrics, clip_metrics, lpips_metrics

__all__ = [
    "FARNEBACK", "HF_RADIUS", "Flows", "as_frames", "available_metrics", "clip_metrics", "compute_all",
    "compute_flows", "hf_fft_energy", "lpips_metrics", "psnr_per_frame", "sobel_sharpness", "valid_mask", "warp", "warp_error",
    "windowed",
]
