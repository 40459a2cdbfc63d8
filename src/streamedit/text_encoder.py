"""Batched Qwen3-VL conditioning for edit mode, numerically the same as upstream's ``encode_prompt``.

Upstream (``DreamLiteMobilePipeline.encode_prompt(mode="edit")``) formats the edit chat template,
resizes the source frame to 512x512 (LANCZOS), runs the processor and the whole
``Qwen3VLForConditionalGeneration`` with ``output_hidden_states=True``, takes the last hidden
state and drops the template's system-prompt prefix. Here the work is split so it can be batched
and overlapped:

* ``prepare_images`` (CPU, runs in the engine's prefetch thread): resize + image processor;
* ``text_inputs`` (once per prompt): the token ids do not depend on the frame, only on the
  prompt and the (fixed) image grid, so they are built once and broadcast over the batch;
* ``encode`` (GPU, side stream): the base model only (``text_encoder.model``): the LM head's
  logits (151936 x 2048 per token) are never needed, and ``last_hidden_state`` is what upstream's
  ``hidden_states[-1]`` is.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from .processor import EDIT_INSTRUCTION, EDIT_TEMPLATE

MAX_PROMPT_CHARS = 2000


def edit_text(prompt: str) -> str:
    """The instruction upstream wraps the user's prompt in, inside the edit chat template."""
    return EDIT_TEMPLATE.format(EDIT_INSTRUCTION.format(prompt))


class TextEncoderRunner:
    def __init__(self, models):
        self.models = models
        self.model = models.text_encoder.model  # Qwen3VLModel: no LM head
        self.image_processor = models.processor.image_processor
        self.size = models.te_image_size
        self._text_cache: dict[str, dict[str, torch.Tensor]] = {}
        self._device_text: tuple[str, dict[str, torch.Tensor]] | None = None  # (prompt, ids on device)

    def release(self) -> None:
        """Drop the device tensors kept between batches (the prompt's token ids)."""
        self._device_text = None

    def prepare_images(self, frames: list[np.ndarray]) -> dict[str, torch.Tensor]:
        """Frames (HxWx3 uint8) -> pixel_values / image_grid_thw, as the processor makes them."""
        images = [Image.fromarray(f).resize((self.size, self.size), resample=Image.LANCZOS) for f in frames]
        out = self.image_processor(images=images, return_tensors="pt")
        return {"pixel_values": out["pixel_values"], "image_grid_thw": out["image_grid_thw"]}

    def text_inputs(self, prompt: str) -> dict[str, torch.Tensor]:
        """input_ids / attention_mask / mm_token_type_ids for one frame (cached per prompt)."""
        if prompt not in self._text_cache:
            probe = Image.new("RGB", (self.size, self.size))
            out = self.models.processor(text=[edit_text(prompt)], images=[probe], return_tensors="pt")
            keep = ("input_ids", "attention_mask", "mm_token_type_ids")
            self._text_cache = {prompt: {k: out[k] for k in keep if k in out}}  # one prompt at a time
        return self._text_cache[prompt]

    @torch.no_grad()
    def encode(self, prompt: str, images: dict[str, torch.Tensor], batch: int) -> torch.Tensor:
        """(batch, tokens - prefix, hidden) prompt embeddings on the model's device/dtype."""
        device, dtype = self.models.device, self.models.dtype
        if self._device_text is None or self._device_text[0] != prompt:  # constant per prompt: copy once
            self._device_text = (prompt, {k: v.to(device) for k, v in self.text_inputs(prompt).items()})
        text = {k: v.expand(batch, -1) for k, v in self._device_text[1].items()}
        out = self.model(
            **text,
            pixel_values=images["pixel_values"].to(device, dtype, non_blocking=True),
            image_grid_thw=images["image_grid_thw"].to(device, non_blocking=True),
        )
        return out.last_hidden_state[:, self.models.edit_prefix_len:].to(dtype)
