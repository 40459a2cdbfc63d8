"""Exact kernel substitutions for the compiled CUDA graphs: the same sums, fewer passes over memory.

Each one computes what the library module computes (up to float rounding) with a kernel that does
more per pass; each was timed alone at the real shapes first (``scripts/gpu_kernel_probe.py``,
docs/benchmarks.md, eleventh session). On other devices and dtypes the library's path runs.

* :func:`prefix_causal_attention` (the fast TE's decoder layers): the suffix queries attend to
  ``[cached prefix ; suffix]`` keys with the causal diagonal aligned bottom-right. That is flash
  attention's own ``is_causal`` for fewer queries than keys, with grouped K/V heads read in place:
  49 µs per layer against 105 µs for transformers' sdpa path (K/V repeated, boolean mask, cuDNN).
* :func:`linear_gelu_tanh` (the fast TE's vision MLPs): fc1 + bias + tanh-GELU as one cuBLASLt GEMM
  with a GELU epilogue, instead of a GEMM and a 134 MB elementwise pass (108 against 146 µs).
* :func:`fuse_tiny_vae` (TAESD): in each residual block, each ``conv -> ReLU`` and the closing
  ``ReLU(conv + skip)`` as one cuDNN fused convolution (``conv + bias + [add] + ReLU``): 0.33 against 0.51 ms for a 64-channel
  3x3 conv at 512², B=8. Wrapped as custom ops because the aten ops have no fake-tensor kernel.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

PREFIX_CAUSAL = "streamedit_prefix_causal"  # the attention implementation name registered with transformers


def shallow(module: nn.Module, **children: nn.Module) -> nn.Module:
    """A copy of ``module`` sharing parameters and buffers, with its own child table (``children`` swapped)."""
    new = copy.copy(module)
    new._modules = {**module._modules, **children}
    return new


def _flash_ok(q: torch.Tensor) -> bool:
    return q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) and q.shape[-1] <= 256


def _flash_causal(query, key, value, dropout, is_causal, scale):
    return torch.ops.aten._scaled_dot_product_flash_attention(query, key, value, dropout, is_causal=is_causal,
                                                              scale=scale)


def prefix_causal_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, **kwargs):
    """transformers attention interface: causal attention, diagonal aligned to the last key.

    Query ``i`` of ``Lq`` sees keys ``0 .. Lk - Lq + i``: the suffix after a cached prefix. Off CUDA
    (or in fp32) it is transformers' sdpa with the explicit mask the caller passes (the same set).
    """
    if _flash_ok(query) and query.shape[2] <= key.shape[2] and dropout == 0.0:
        # flash's is_causal is bottom-right aligned when Lq < Lk, and it reads grouped K/V heads directly
        out = _flash_causal(query, key, value, 0.0, True, scaling)[0]
        return out.transpose(1, 2).contiguous(), None
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                  **kwargs)


def register_prefix_causal() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(PREFIX_CAUSAL, prefix_causal_attention)


def with_prefix_causal(layers: nn.ModuleList) -> nn.ModuleList:
    """Copies of decoder layers (parameters shared) whose attention uses :func:`prefix_causal_attention`."""
    register_prefix_causal()
    out = []
    for layer in layers:
        attn = shallow(layer.self_attn)
        attn.config = copy.copy(attn.config)  # the attention reads its implementation from its config
        attn.config._attn_implementation = PREFIX_CAUSAL
        out.append(shallow(layer, self_attn=attn))
    return nn.ModuleList(out)


def linear_gelu_tanh(x: torch.Tensor, fc: nn.Linear) -> torch.Tensor:
    """``gelu(fc(x), approximate="tanh")``; on CUDA one GEMM with cuBLASLt's GELU (tanh) epilogue.

    Only CUDA: the CPU ``_addmm_activation`` applies the erf GELU instead.
    """
    if not (x.is_cuda and fc.bias is not None):
        return F.gelu(fc(x), approximate="tanh")
    flat = x.reshape(-1, x.shape[-1])
    return torch._addmm_activation(fc.bias, flat, fc.weight.t(), use_gelu=True).view(*x.shape[:-1], -1)


# ---- TAESD: cuDNN conv + bias (+ add) + ReLU, for the blocks' 3x3 / stride 1 / padding 1 convs -----------
def _same_size(x, weight):
    return torch.empty((x.shape[0], weight.shape[0], *x.shape[2:]), dtype=x.dtype, device=x.device,
                       memory_format=torch.channels_last)


@torch.library.custom_op("streamedit::conv3x3_relu", mutates_args=())
def conv3x3_relu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """``relu(conv2d(x, weight, bias, padding=1))``, channels_last out; one cuDNN fused kernel on CUDA."""
    x = x.contiguous(memory_format=torch.channels_last)
    if x.is_cuda:
        out = torch.cudnn_convolution_relu(x, weight, bias, (1, 1), (1, 1), (1, 1), 1)
    else:
        out = F.relu(F.conv2d(x, weight, bias, padding=1))
    return out.contiguous(memory_format=torch.channels_last)


@conv3x3_relu.register_fake
def _(x, weight, bias):
    return _same_size(x, weight)


@torch.library.custom_op("streamedit::conv3x3_add_relu", mutates_args=())
def conv3x3_add_relu(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """``relu(conv2d(x, weight, bias, padding=1) + z)``, channels_last out; one cuDNN fused kernel on CUDA."""
    x = x.contiguous(memory_format=torch.channels_last)
    z = z.contiguous(memory_format=torch.channels_last)
    if x.is_cuda:
        out = torch.cudnn_convolution_add_relu(x, weight, z, 1.0, bias, (1, 1), (1, 1), (1, 1), 1)
    else:
        out = F.relu(F.conv2d(x, weight, bias, padding=1) + z)
    return out.contiguous(memory_format=torch.channels_last)


@conv3x3_add_relu.register_fake
def _(x, weight, bias, z):
    return _same_size(x, weight)


def _fusable(conv) -> bool:
    """A 3x3, stride 1, padding 1 conv with a bias, in channel counts cuDNN's fusion engines take."""
    return (isinstance(conv, nn.Conv2d) and conv.bias is not None and conv.kernel_size == (3, 3)
            and conv.stride == (1, 1) and conv.padding == (1, 1) and conv.dilation == (1, 1) and conv.groups == 1
            and conv.padding_mode == "zeros" and conv.in_channels % 8 == 0 and conv.out_channels % 8 == 0)


class FusedTinyBlock(nn.Module):
    """diffusers' ``AutoencoderTinyBlock`` (``ReLU(conv(ReLU(conv(ReLU(conv(x))))) + skip(x))``), fused."""

    def __init__(self, block):
        super().__init__()
        self.conv, self.skip = block.conv, block.skip

    def forward(self, x):
        c0, c1, c2 = self.conv[0], self.conv[2], self.conv[4]
        h = conv3x3_relu(x, c0.weight, c0.bias)
        h = conv3x3_relu(h, c1.weight, c1.bias)
        return conv3x3_add_relu(h, c2.weight, c2.bias, self.skip(x))


def _block_fusable(block) -> bool:
    seq = getattr(block, "conv", None)
    return (type(block).__name__ == "AutoencoderTinyBlock" and isinstance(seq, nn.Sequential) and len(seq) == 5
            and all(_fusable(seq[i]) for i in (0, 2, 4))
            and all(isinstance(seq[i], nn.ReLU) for i in (1, 3)) and isinstance(block.fuse, nn.ReLU))


def _fuse_sequential(seq: nn.Sequential) -> nn.Sequential:
    return nn.Sequential(*(FusedTinyBlock(m) if _block_fusable(m) else m for m in seq))


def fuse_tiny_vae(vae):
    """A copy of an ``AutoencoderTiny`` (parameters shared) whose encoder and decoder layers are fused.

    Only the ``layers`` Sequentials change; any other VAE is returned as it is.
    """
    parts = [getattr(vae, n, None) for n in ("encoder", "decoder")]
    if not all(isinstance(getattr(p, "layers", None), nn.Sequential) for p in parts):
        return vae
    return shallow(vae, **{name: shallow(part, layers=_fuse_sequential(part.layers))
                           for name, part in zip(("encoder", "decoder"), parts)})
