"""Small pieces the ``train base`` stages share: image tensors, the image loss, the LR schedule, autocast."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def to_pm1(images_u8: torch.Tensor) -> torch.Tensor:
    """(N,H,W,3) uint8 -> (N,3,H,W) float in [-1, 1] (the runtime's VAE input)."""
    return images_u8.permute(0, 3, 1, 2).float() / 127.5 - 1.0


def sobel(x: torch.Tensor) -> torch.Tensor:
    k = torch.tensor([[1.0, 0, -1], [2, 0, -2], [1, 0, -1]], device=x.device)
    k = torch.stack([k, k.T]).unsqueeze(1).repeat(x.shape[1], 1, 1, 1)
    return F.conv2d(x, k.to(x.dtype), padding=1, groups=x.shape[1])


def image_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """L1 + MSE + Sobel-gradient L1 (the filters' edges and lines are what a plain L2 blurs away)."""
    return F.l1_loss(pred, target) + F.mse_loss(pred, target) + 0.5 * F.l1_loss(sobel(pred), sobel(target))


def lr_at(step: int, total: int, base: float, warmup: int = 100) -> float:
    """Linear warm-up, then cosine to 0."""
    if step < warmup:
        return base * (step + 1) / warmup
    return base * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(total - warmup, 1)))


def autocast(device: torch.device):
    """bf16 autocast on CUDA (no weight-cast cache: the cached casts would outlive a CUDA-graph capture)."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=False)
    return torch.autocast("cpu", enabled=False)


def step_and_log(opt, params, loss: torch.Tensor, rows: list, bar, phase: str, step: int, total: int) -> None:
    """Backward, clip to norm 1, step; log the loss every 100 steps and at the last (``.item()`` syncs)."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    opt.step()
    if step % 100 == 0 or step == total - 1:
        rows.append({"phase": phase, "step": step, "loss": loss.item()})
        if bar is not None:
            bar.set_postfix(phase=phase, loss=f"{rows[-1]['loss']:.4f}", refresh=False)
    if bar is not None:
        bar.update(1)
