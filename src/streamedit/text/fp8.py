"""FP8 (e4m3) Linears for the fast text encoder (``te_fp8``), and how far their output moves.

:class:`Fp8Linear` replaces an ``nn.Linear``: the weight is quantized once (per output row, or per
tensor), the activation is quantized per call with an on-device amax (per token row, or per
tensor; no host sync), and the product runs as ``torch._scaled_mm`` on CUDA (Hopper/Ada FP8
tensor cores) with fp32 accumulation, the scales applied to the fp32 result, then the bias.
Row-wise scaling (the default with a bf16 model) keeps one outlier token or channel from crushing
the resolution of all the others; ``_scaled_mm`` supports it only with a bf16 output, so other
dtypes use per-tensor scales. Off CUDA the same product is computed in fp32 from the same e4m3
values and scales (:func:`fp8_matmul`), which is what ``_scaled_mm`` computes (tests check it).
This is an approximation (3 mantissa bits): :func:`te_fp8_agreement` says how much.
"""

from __future__ import annotations

import torch
from torch import nn

from ..accel.kernels import shallow

E4M3 = torch.float8_e4m3fn
E4M3_MAX = 448.0


def quantize(x: torch.Tensor, rowwise: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(e4m3 values, fp32 scale) with ``x ≈ values * scale``; scale (rows, 1) or a 0-dim tensor."""
    amax = x.abs().amax(dim=-1, keepdim=True) if rowwise else x.abs().amax()
    scale = amax.float().clamp(min=1e-12) / E4M3_MAX  # |x / scale| <= 448: no saturation needed
    return (x.float() / scale).to(E4M3), scale


def fp8_matmul(xq, wq, x_scale, w_scale, out_dtype) -> torch.Tensor:
    """``(xq * x_scale) @ (wq.T * w_scale)`` -> out_dtype for e4m3 ``xq`` (M, K) and ``wq`` (N, K).

    Scales: both 0-dim (per tensor) or ``x_scale`` (M, 1) and ``w_scale`` (1, N) (per row). CUDA:
    ``torch._scaled_mm`` (mat2 column-major = the (N, K) weight transposed). Elsewhere: the same
    math in fp32 (products of e4m3 values are exact in fp32; only the summation order differs).
    """
    if xq.is_cuda:
        return torch._scaled_mm(xq, wq.t(), scale_a=x_scale, scale_b=w_scale, out_dtype=out_dtype)
    return ((xq.float() @ wq.float().t()) * x_scale * w_scale).to(out_dtype)


class Fp8Linear(nn.Module):
    """``nn.Linear`` as an FP8 matmul (see the module docstring). Dims must be multiples of 16."""

    def __init__(self, linear: nn.Linear, rowwise: bool | None = None):
        super().__init__()
        w = linear.weight.detach()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.out_dtype = w.dtype
        # _scaled_mm only does row-wise scales with a bf16 output
        self.rowwise = (w.dtype == torch.bfloat16) if rowwise is None else rowwise
        wq, w_scale = quantize(w, self.rowwise)  # once: the weights are constants
        self.register_buffer("weight", wq)  # (out, in) e4m3
        self.register_buffer("w_scale", w_scale.t().contiguous() if self.rowwise else w_scale)  # (1, out)
        self.bias = linear.bias  # shared with the original Linear

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x.reshape(-1, x.shape[-1])
        xq, x_scale = quantize(x2, self.rowwise)
        out = fp8_matmul(xq, self.weight, x_scale, self.w_scale, self.out_dtype)
        if self.bias is not None:
            out = out + self.bias.to(out.dtype)
        return out.view(*x.shape[:-1], self.out_features)


def with_fp8_linears(module: nn.Module) -> nn.Module:
    """A copy of the module tree that shares every parameter, its 16-aligned Linears as Fp8Linear.

    The shared model (the reference runner, other engines) is left untouched.
    """
    if isinstance(module, nn.Linear):
        aligned = module.in_features % 16 == 0 and module.out_features % 16 == 0
        return Fp8Linear(module) if aligned else module
    return shallow(module, **{n: with_fp8_linears(m) for n, m in module._modules.items() if m is not None})


def check_fp8_device(device) -> str | None:
    """Why ``te_fp8`` cannot run on ``device`` (None if it can)."""
    device = torch.device(device)
    if device.type != "cuda":
        return f"--te-fp8 needs a CUDA GPU with FP8 tensor cores (device is {device.type})"
    cap = torch.cuda.get_device_capability(device)
    if cap < (8, 9):
        return f"--te-fp8 needs FP8 tensor cores (compute capability >= 8.9; this GPU has {cap[0]}.{cap[1]})"
    return None


