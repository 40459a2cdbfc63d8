"""The six ``DreamLiteMobilePipeline`` components (:class:`Models`) and what the runtime derives from them."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from diffusers import AutoencoderTiny, DreamLiteMobilePipeline, DreamLiteUNetModel, FlowMatchEulerDiscreteScheduler
from transformers import Qwen3VLForConditionalGeneration

from . import processor as proc

COMPONENTS = ("text_encoder", "tokenizer", "processor", "vae", "unet", "scheduler")
# Which text-encoder output a model was trained on (``Models.te_features``; a model folder's
# ``streamedit.json`` key ``te_features``, default "prenorm"). DreamLite-mobile was trained with
# transformers 4.57, whose ``hidden_states[-1]`` is the last decoder layer *before* the final RMSNorm;
# transformers >= 5 returns the normed output there. The bundled demo model was trained on the normed one.
TE_FEATURES = {
    "prenorm": "last decoder layer before the final norm (transformers 4.57 hidden_states[-1], what DreamLite "
               "was trained on)",
    "normed": "last decoder layer after the final norm (last_hidden_state; what this model was trained on)",
}


@dataclass
class Models:
    """The six DreamLiteMobilePipeline components plus what the runtime derives from them."""

    text_encoder: Qwen3VLForConditionalGeneration
    tokenizer: object
    processor: object
    vae: AutoencoderTiny
    unet: DreamLiteUNetModel
    scheduler: FlowMatchEulerDiscreteScheduler
    source: str = ""
    edit_prefix_len: int = proc.QWEN_EDIT_PREFIX_LEN  # TE output tokens dropped (upstream: 64 for Qwen)
    te_image_size: int = 512  # upstream resizes the TE's view of the source to 512x512
    te_features: str = "prenorm"  # the TE output the U-Net was trained on (TE_FEATURES)
    extras: dict = field(default_factory=dict)

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.unet.parameters()).dtype

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.encoder_block_out_channels) - 1)

    def pipeline(self) -> DreamLiteMobilePipeline:
        """diffusers' own pipeline over the same components (the reference the engine is tested against)."""
        pipe = DreamLiteMobilePipeline(**{c: getattr(self, c) for c in COMPONENTS})
        pipe.prompt_template_encode_edit_start_idx = self.edit_prefix_len
        return pipe

    def save_pretrained(self, path: str | os.PathLike) -> None:
        """Write a diffusers-format folder laid out like the published checkpoint."""
        self.pipeline().save_pretrained(path)
        index_path = Path(path) / "model_index.json"
        index = json.loads(index_path.read_text())
        index["processor"] = ["transformers", "Qwen3VLProcessor"]
        index_path.write_text(json.dumps(index, indent=2))
