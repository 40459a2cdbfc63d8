"""The LLLite conditioning CNNs of every hook at once, for inference.

Each hook's ``conditioning1`` is a stack of convolutions with kernel == stride and no padding, so
each layer is a matmul over non-overlapping patches. :class:`CondEmbedder` runs the first layer of
all hooks as one GEMM on the shared cond image and each later layer as one batched GEMM per stride
group: the same sums as hooks x layers convolutions, in about 20 operations instead of ~150. A
staggered refresh (one batch row per batch) sits on the main stream's critical path and is mostly
launch overhead: on the H100 its span went from 3.6 to 2.0 ms with this (docs/benchmarks.md).

The packed weights are kept between calls and rebuilt, in place, when a parameter changed
(:meth:`CondEmbedder.sync`): a CUDA graph that captured a refresh reads them by address.
"""

from __future__ import annotations

import torch
from torch import nn


def _convs(module) -> list[nn.Conv2d]:
    return [layer for layer in module.conditioning1 if isinstance(layer, nn.Conv2d)]


def patch_layout(groups: dict[int, list]) -> bool:
    """Whether every conv of these modules is a patch matmul (kernel == stride, no padding, same depth
    within a stride group, one first-layer kernel for all)."""
    if len({_convs(m)[0].kernel_size for mods in groups.values() for m in mods}) != 1:
        return False
    for mods in groups.values():
        depths = {len(_convs(m)) for m in mods}
        if len(depths) != 1 or any(c.kernel_size != c.stride or c.kernel_size[0] != c.kernel_size[1]
                                   or c.padding != (0, 0) for m in mods for c in _convs(m)):
            return False
    return True


def _patches(x: torch.Tensor, k: int) -> torch.Tensor:
    """(B, H, W, *lead, c) -> (*lead, B*h*w, c*k*k): each k x k patch in the (c, kh, kw) order of a
    conv weight's ``flatten(1)``."""
    b, hh, ww, *lead, c = x.shape
    h, w = hh // k, ww // k
    x = x.reshape(b, h, k, w, k, *lead, c)
    n = len(lead)
    lead_dims = tuple(range(5, 5 + n))
    x = x.permute(*lead_dims, 0, 1, 3, 5 + n, 2, 4)  # (*lead, B, h, w, c, kh, kw)
    return x.reshape(*x.shape[:n], b * h * w, c * k * k)


class CondEmbedder:
    """``conditioning1`` of all hooks, grouped by stride: ``images (B,3,H,W) -> {stride: (B,h,w,n,c)}``."""

    def __init__(self, groups: dict[int, list]):
        self.groups = groups
        self.params = [p for mods in groups.values() for m in mods for c in _convs(m) for p in (c.weight, c.bias)]
        first = _convs(next(iter(groups.values()))[0])[0]
        self.first_kernel = first.kernel_size[0]
        # per stride: (hooks, first layer's channels, kernel of each later layer); fixed with the modules
        self.layout = {stride: (len(mods), _convs(mods[0])[0].out_channels,
                                [c.kernel_size[0] for c in _convs(mods[0])[1:]]) for stride, mods in groups.items()}
        self._key = None
        self._packed: dict = {}

    def sync(self) -> None:
        """(Re)pack the weights if a parameter changed since the last packing (in place when it can)."""
        key = [(p.data_ptr(), p._version, p.dtype) for p in self.params]
        if key == self._key:
            return
        self._key = key
        with torch.no_grad():
            packed = self._pack()
            if self._packed.keys() == packed.keys() and all(
                    a.shape == b.shape and a.dtype == b.dtype and a.device == b.device
                    for k in packed for a, b in zip(self._packed[k], packed[k])):
                for k in packed:
                    for a, b in zip(self._packed[k], packed[k]):
                        a.copy_(b)
            else:
                self._packed = packed

    def _pack(self) -> dict:
        first = [_convs(m)[0] for mods in self.groups.values() for m in mods]
        packed = {"first": (torch.cat([c.weight.flatten(1) for c in first]), torch.cat([c.bias for c in first]))}
        for stride, mods in self.groups.items():
            for depth in range(1, len(_convs(mods[0]))):
                convs = [_convs(m)[depth] for m in mods]
                packed[stride, depth] = (torch.stack([c.weight.flatten(1) for c in convs]).transpose(1, 2),
                                         torch.stack([c.bias for c in convs]).unsqueeze(1))
        return packed

    def __call__(self, images: torch.Tensor) -> dict[int, torch.Tensor]:
        self.sync()
        b, k = images.shape[0], self.first_kernel
        h, w = images.shape[2] // k, images.shape[3] // k
        weight, bias = self._packed["first"]
        y = torch.addmm(bias, _patches(images.permute(0, 2, 3, 1), k), weight.t())  # every hook's layer 1
        y_relu = torch.relu(y)
        out, col = {}, 0
        for stride, (n, c, kernels) in self.layout.items():
            x = (y_relu if kernels else y)[:, col: col + n * c].reshape(b, h, w, n, c)
            col += n * c
            for d, kd in enumerate(kernels, start=1):
                weight, bias = self._packed[stride, d]
                hd, wd = x.shape[1] // kd, x.shape[2] // kd
                z = torch.baddbmm(bias, _patches(x, kd), weight)  # (n, B*hd*wd, out)
                x = z.transpose(0, 1).reshape(b, hd, wd, n, z.shape[-1])
                if d < len(kernels):
                    x = torch.relu(x)
            out[stride] = x
        return out
