"""The published DreamLite-mobile / Qwen3-VL-2B architectures and the tiny and demo ones, built with random weights (``random:real|tiny|demo``)."""

from __future__ import annotations

import contextlib

import torch
from diffusers import AutoencoderTiny, DreamLiteUNetModel, FlowMatchEulerDiscreteScheduler
from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

from . import processor as proc
from .components import Models

_UNET_BLOCKS = dict(
    down_block_types=("DreamLiteCrossAttnNoSelfAttnDownBlock2D", "DreamLiteCrossAttnNoSelfAttnDownBlock2D",
                      "DreamLiteCrossAttnDownBlock2D"),
    mid_block_type="DreamLiteUNetMidBlock2DCrossAttn",
    up_block_types=("DreamLiteCrossAttnUpBlock2D", "DreamLiteCrossAttnNoSelfAttnUpBlock2D", "DreamLiteUpBlock2D"),
    encoder_hid_dim_type="text_proj_rms", addition_embed_type="time", num_kv_heads=1, qk_norm="rms_norm",
    use_sep_conv=True, use_linear_projection=True, in_channels=4, out_channels=4, layers_per_block=2,
)


# Published DreamLite-mobile U-Net: 0.390 B parameters, 108 hook sites (38 down / 16 mid / 54 up).
REAL_UNET = dict(_UNET_BLOCKS, sample_size=128, block_out_channels=(256, 512, 896), attention_head_dim=(4, 8, 14),
                 transformer_layers_per_block=(1, 2, 4), cross_attention_dim=2304, encoder_hid_dim=2048,
                 addition_time_embed_dim=256, projection_class_embeddings_input_dim=512, ff_mult=3)


TINY_UNET = dict(_UNET_BLOCKS, sample_size=8, block_out_channels=(32, 32, 64), attention_head_dim=(1, 1, 2),
                 transformer_layers_per_block=(1, 1, 2), cross_attention_dim=48, encoder_hid_dim=64,
                 addition_time_embed_dim=8, projection_class_embeddings_input_dim=16, ff_mult=2, layers_per_block=1)


# Qwen3-VL-2B: 2.128 B parameters.
REAL_TE_TEXT = dict(hidden_size=2048, num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=8,
                    head_dim=128, intermediate_size=6144, vocab_size=151936, rope_theta=5e6, rms_norm_eps=1e-6,
                    max_position_embeddings=262144,
                    rope_scaling={"rope_type": "default", "mrope_section": [24, 20, 20], "mrope_interleaved": True})


REAL_TE_VISION = dict(depth=24, hidden_size=1024, intermediate_size=4096, num_heads=16, out_hidden_size=2048,
                      patch_size=16, spatial_merge_size=2, temporal_patch_size=2, deepstack_visual_indexes=[5, 11, 17],
                      num_position_embeddings=2304, in_channels=3)


TINY_TE_TEXT = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                    intermediate_size=128, rope_theta=5e6, rms_norm_eps=1e-6, max_position_embeddings=4096,
                    rope_scaling={"rope_type": "default", "mrope_section": [2, 3, 3], "mrope_interleaved": True})


TINY_TE_VISION = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64, patch_size=16,
                      spatial_merge_size=2, temporal_patch_size=2, deepstack_visual_indexes=[0],
                      num_position_embeddings=64, in_channels=3)


TINY_VAE = dict(encoder_block_out_channels=(16, 16, 16, 16), decoder_block_out_channels=(16, 16, 16, 16),
                num_encoder_blocks=(1, 1, 1, 1), num_decoder_blocks=(1, 1, 1, 1))


# The bundled demo model (train/base.py trains it): small enough for >= 4 fps at 256x256 on 2 CPU cores.
DEMO_UNET = dict(_UNET_BLOCKS, sample_size=32, block_out_channels=(64, 128, 192), attention_head_dim=(1, 2, 3),
                 transformer_layers_per_block=(1, 1, 2), cross_attention_dim=192, encoder_hid_dim=128,
                 addition_time_embed_dim=32, projection_class_embeddings_input_dim=64, ff_mult=2, in_channels=8,
                 out_channels=8)


DEMO_TE_TEXT = dict(TINY_TE_TEXT, hidden_size=128, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                    intermediate_size=256,
                    rope_scaling={"rope_type": "default", "mrope_section": [4, 6, 6], "mrope_interleaved": True})


DEMO_TE_VISION = dict(TINY_TE_VISION, hidden_size=64, intermediate_size=128, out_hidden_size=128,
                      num_position_embeddings=1024)


# No full-resolution blocks: the 256x256 stages are one conv each (the CPU cost of TAESD is there);
# 8 latent channels instead of 4 buy back the reconstruction quality that costs.
DEMO_VAE = dict(encoder_block_out_channels=(32, 32, 32, 32), decoder_block_out_channels=(32, 32, 32, 32),
                num_encoder_blocks=(0, 2, 2, 2), num_decoder_blocks=(2, 2, 2, 0), latent_channels=8)


ARCHITECTURES = {"real": (REAL_UNET, REAL_TE_TEXT, REAL_TE_VISION, {}),
                 "tiny": (TINY_UNET, TINY_TE_TEXT, TINY_TE_VISION, TINY_VAE),
                 "demo": (DEMO_UNET, DEMO_TE_TEXT, DEMO_TE_VISION, DEMO_VAE)}


def build_random(arch: str, device: torch.device, dtype: torch.dtype, seed: int = 0) -> Models:
    """Random weights in the exact published architecture (``real``), the demo one or a toy one (``tiny``)."""
    unet_cfg, text_cfg, vision_cfg, vae_cfg = ARCHITECTURES[arch]
    tokenizer = proc.build_offline_tokenizer()
    if arch != "real":  # the real vocabulary is Qwen's; small builds use the offline tokenizer's
        text_cfg = dict(text_cfg, vocab_size=len(tokenizer))
    te_config = _te_config(tokenizer, text_cfg, vision_cfg)
    torch.manual_seed(seed)
    # Built directly in the target dtype on the target device: no fp32 copy of 2.5 B parameters.
    with torch.device(device), _default_dtype(dtype):
        text_encoder = Qwen3VLForConditionalGeneration(te_config)
        unet = DreamLiteUNetModel(**unet_cfg)
        vae = AutoencoderTiny(**vae_cfg)
    vision = te_config.vision_config
    models = Models(
        text_encoder=text_encoder.to(dtype).eval(), tokenizer=tokenizer,
        processor=proc.build_processor(tokenizer, vision.patch_size, vision.spatial_merge_size),
        vae=vae.eval(), unet=unet.eval(),  # already in dtype (built under it)
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5,
                                                  max_shift=1.16, base_image_seq_len=256, max_image_seq_len=4096),
        edit_prefix_len=proc.edit_prefix_len(tokenizer),
    )
    return models


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype):
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def _te_config(tokenizer, text: dict, vision: dict) -> Qwen3VLConfig:
    ids = {k: tokenizer.convert_tokens_to_ids(t) for k, t in (
        ("image_token_id", "<|image_pad|>"), ("video_token_id", "<|video_pad|>"),
        ("vision_start_token_id", "<|vision_start|>"), ("vision_end_token_id", "<|vision_end|>"))}
    return Qwen3VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=True, **ids)
