"""What the engine measures and how runs are identified: span names of the per-batch CUDA-event timings, the table order of components, the device name, strict JSON lines."""

from __future__ import annotations

import json
import platform

import numpy as np

# (name, start event, end event) of the per-batch CUDA-event timings; unet_decode: the fused graph
SPANS = (("te", "te0", "te1"), ("vae_encode", "te1", "enc1"), ("cond", "cond0", "unet0"),
         ("unet", "unet0", "unet1"), ("vae_decode", "unet1", "dec1"), ("unet_decode", "unet0", "dec1"),
         ("wait_side", "main0", "cond0"), ("d2h", "dec1", "out1"))


# table order; unet_decode: U-Net + VAE decode as one compiled graph (not separable by events)
COMPONENTS = ("te", "vae_encode", "cond", "unet", "vae_decode", "unet_decode", "flow_wait", "flow_cpu")


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
