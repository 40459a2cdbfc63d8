"""The contract between the engine and a text encoder; both runners (``exact.py``, ``fast.py``) meet it."""

from __future__ import annotations

from typing import Protocol, TypedDict, Union, runtime_checkable

import numpy as np
import torch


class ProcessorImages(TypedDict):
    """The exact runner's inputs: what Qwen3-VL's image processor makes of the frames."""
    pixel_values: torch.Tensor
    image_grid_thw: torch.Tensor


# exact: processor outputs; fast: the (B,H,W,3) uint8 frames themselves (patchified on the device)
TEInputs = Union[ProcessorImages, torch.Tensor]


@runtime_checkable
class TextEncoder(Protocol):
    size: int  # the TE's view of a frame (te_size)

    def prepare_images(self, frames: list[np.ndarray]) -> TEInputs:
        """Host-side inputs for a batch (the prefetch thread), pinned when the model is on CUDA."""

    def encode(self, prompt: str, images: TEInputs, batch: int) -> torch.Tensor:
        """(batch, tokens after the prefix, hidden) embeddings on the model's device, on the current stream."""

    def text_mask(self, prompt: str) -> torch.Tensor | None:
        """(1, tokens) mask of the embeddings for the U-Net (padded view, te_size 256); None: unpadded."""

    def check_prompt(self, prompt: str) -> None:
        """Raise StreameditError if ``prompt`` cannot be encoded (called before it reaches a batch)."""

    def output_shape(self, prompt: str) -> tuple[int, int] | None:
        """(tokens, hidden) of :meth:`encode` per frame, without running it; None where unknown until then."""

    def release(self) -> None:
        """Drop the device tensors kept between batches."""
