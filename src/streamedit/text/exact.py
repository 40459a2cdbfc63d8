"""Batched Qwen3-VL conditioning for edit mode: upstream's ``encode_prompt`` with DreamLite's features.

Upstream (``DreamLiteMobilePipeline.encode_prompt(mode="edit")``) formats the edit chat template,
resizes the source frame to 512x512 (LANCZOS), runs the processor and the whole
``Qwen3VLForConditionalGeneration`` with ``output_hidden_states=True``, takes ``hidden_states[-1]``
and drops the template's system-prompt prefix. Here the work is split so it can be batched and
overlapped:

* ``prepare_images`` (CPU, runs in the engine's prefetch thread): resize + image processor;
* ``text_inputs`` (once per prompt): the token ids do not depend on the frame, only on the
  prompt and the (fixed) image grid, so they are built once and broadcast over the batch;
* ``encode`` (GPU, side stream): the base model only (``text_encoder.model``; the LM head's
  logits, 151936 x 2048 per token, are never needed).

Features (``Models.te_features``, :data:`streamedit.models.components.TE_FEATURES`): DreamLite-mobile
was trained with transformers 4.57, where ``hidden_states[-1]`` is the output of the last decoder layer
*before* the final RMSNorm; transformers >= 5 returns the normed ``last_hidden_state`` there (the model
card's "block pattern artifacts"). For such a model ("prenorm", the default) both runners return the
pre-norm output on any transformers version: the exact one runs a parameter-sharing copy of the model
whose final norm is the identity (its compute is skipped). A model trained on the normed output (the
bundled demo model, ``streamedit.json``: ``"te_features": "normed"``) gets that one.
Tests: ``test_te_golden.py`` (a 4.57.3 golden), ``test_engine.py`` (diffusers with the same features).

``te_size`` (:data:`TE_VIEWS`): 512 is upstream's view (LANCZOS, 256 image tokens per frame, no
padding); 256 is the streaming paper's (otanl/dreamlite-stream ``encode_prompt_edit_batch``):
BILINEAR, 64 image tokens, the processor pads (right, the tokenizer's pad token) or truncates the
sequence to 256 tokens, and the attention mask after the prefix goes to the U-Net with the embeddings.
Pad rows of the embeddings are zeros: the U-Net's mask gives them no weight.
"""

from __future__ import annotations

import logging
import threading

import numpy as np
import torch
from PIL import Image
from torch import nn

from ..accel.kernels import shallow
from ..models.processor import EDIT_INSTRUCTION, EDIT_TEMPLATE
from .base import ProcessorImages

log = logging.getLogger(__name__)

# te_size -> (PIL resample, token count the sequence is padded/truncated to; None: neither)
TE_VIEWS = {512: (Image.LANCZOS, None), 256: (Image.BILINEAR, 256)}


def edit_text(prompt: str) -> str:
    """The instruction upstream wraps the user's prompt in, inside the edit chat template."""
    return EDIT_TEMPLATE.format(EDIT_INSTRUCTION.format(prompt))


def check_te_size(te_size: int) -> None:
    if te_size not in TE_VIEWS:
        raise ValueError(f"te_size must be one of {sorted(TE_VIEWS)}, got {te_size}")


def check_features(config) -> None:
    """The pre-norm feature is the last decoder layer's output; 4.57 records it before any deepstack add.
    No published model adds deepstack features at its last layer; a toy config that did is refused."""
    layers = config.text_config.num_hidden_layers
    if len(config.vision_config.deepstack_visual_indexes) >= layers:
        raise ValueError(f"deepstack reaches the last of the text model's {layers} decoder layers: "
                         "the pre-norm feature convention is not defined for this configuration")


def prenorm_model(model: nn.Module) -> nn.Module:
    """A copy of ``Qwen3VLModel`` sharing every parameter whose language model's final norm is the identity:
    its ``last_hidden_state`` is transformers 4.57's ``hidden_states[-1]``."""
    return shallow(model, language_model=shallow(model.language_model, norm=nn.Identity()))


def feature_model(models) -> nn.Module:
    """The base model (no LM head) whose ``last_hidden_state`` is the feature ``models`` was trained on."""
    if models.te_features == "normed":
        return models.text_encoder.model
    check_features(models.text_encoder.config)
    return prenorm_model(models.text_encoder.model)


# The engine thread and a caller's check_prompt share a processor; module level, not on the runner: a runner
# is pickled by torch's precompile, and a lock cannot be.
_TOKENIZER_LOCK = threading.Lock()


class TextEncoderRunner:
    """Upstream's ``encode_prompt`` for a batch of frames (a :class:`~streamedit.text.base.TextEncoder`)."""

    def __init__(self, models, te_size: int | None = None):
        self.models = models
        self.model = feature_model(models)  # Qwen3VLModel: no LM head; "prenorm": no final norm either
        self.image_processor = models.processor.image_processor
        self.size = te_size or models.te_image_size
        check_te_size(self.size)
        self.resample, self.pad_to = TE_VIEWS[self.size]
        self._text_cache: dict[str, dict[str, torch.Tensor]] = {}
        self._device_text: tuple[str, dict[str, torch.Tensor]] | None = None  # (prompt, ids on device)

    def release(self) -> None:
        """Drop the device tensors kept between batches (the prompt's token ids)."""
        self._device_text = None

    def prepare_images(self, frames: list[np.ndarray]) -> ProcessorImages:
        """Frames (HxWx3 uint8) -> pixel_values / image_grid_thw, as the processor makes them (pinned on CUDA:
        the prefetch thread pays for it, and the side stream's copies are asynchronous)."""
        images = [Image.fromarray(f).resize((self.size, self.size), resample=self.resample) for f in frames]
        out = self.image_processor(images=images, return_tensors="pt")
        pin = self.models.device.type == "cuda"
        return {k: out[k].pin_memory() if pin else out[k] for k in ("pixel_values", "image_grid_thw")}

    def check_prompt(self, prompt: str) -> None:
        """Every prompt can be encoded (the processor truncates the te_size 256 view's sequence)."""

    def output_shape(self, prompt: str) -> None:
        """Unknown until the first :meth:`encode` (the processor decides the token count)."""
        return None

    def text_inputs(self, prompt: str) -> dict[str, torch.Tensor]:
        """input_ids / attention_mask / mm_token_type_ids for one frame (cached per prompt)."""
        with _TOKENIZER_LOCK:  # a fast tokenizer whose padding is being set is not re-entrant
            return self._text_inputs(prompt)

    def _text_inputs(self, prompt: str) -> dict[str, torch.Tensor]:
        if prompt not in self._text_cache:
            probe = Image.new("RGB", (self.size, self.size))
            pad = dict(padding="max_length", max_length=self.pad_to, truncation=True) if self.pad_to else {}
            out = self.models.processor(text=[edit_text(prompt)], images=[probe], return_tensors="pt", **pad)
            if pad:  # the fast tokenizer keeps these settings, and save_pretrained would write them out
                backend = getattr(self.models.processor.tokenizer, "backend_tokenizer", None)
                if backend is not None:
                    backend.no_truncation()
                    backend.no_padding()
            if self.pad_to and out["attention_mask"].all():  # full: the paper's processor call truncated it
                log.warning("te_size %d: the prompt fills all %d tokens; longer prompts are cut (as in the "
                            "paper's code)", self.size, self.pad_to)
            keep = ("input_ids", "attention_mask", "mm_token_type_ids")
            self._text_cache = {prompt: {k: out[k] for k in keep if k in out}}  # one prompt at a time
        return self._text_cache[prompt]

    def _device_inputs(self, prompt: str) -> dict[str, torch.Tensor]:
        if self._device_text is None or self._device_text[0] != prompt:  # constant per prompt: copy once
            self._device_text = (prompt, {k: v.to(self.models.device) for k, v in self.text_inputs(prompt).items()})
        return self._device_text[1]

    def text_mask(self, prompt: str) -> torch.Tensor | None:
        """(1, tokens - prefix) mask of the embeddings for the U-Net (long, on the device); None unpadded."""
        if not self.pad_to:
            return None
        return self._device_inputs(prompt)["attention_mask"][:, self.models.edit_prefix_len:]

    @torch.no_grad()
    def encode(self, prompt: str, images: ProcessorImages, batch: int) -> torch.Tensor:
        """(batch, tokens - prefix, hidden) prompt embeddings on the model's device/dtype."""
        device, dtype = self.models.device, self.models.dtype
        text = {k: v.expand(batch, -1) for k, v in self._device_inputs(prompt).items()}
        out = self.model(
            **text,
            pixel_values=images["pixel_values"].to(device, dtype, non_blocking=True),
            image_grid_thw=images["image_grid_thw"].to(device, non_blocking=True),
        )
        embeds = out.last_hidden_state[:, self.models.edit_prefix_len:]
        if self.pad_to:  # pad rows: zeros (masked in the U-Net)
            embeds = embeds * self.text_mask(prompt)[..., None].to(embeds.dtype)
        return embeds.to(dtype)
