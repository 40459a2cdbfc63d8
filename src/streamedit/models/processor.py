"""Tokenizer and processor plumbing for the Qwen3-VL text encoder.

Two problems solved here:

* transformers' stock ``Qwen3VLProcessor`` cannot be constructed (or loaded) without torchvision,
  because it always builds a video processor. CPU-only users (and this project's CI) have no
  torchvision, so :class:`ImageOnlyQwen3VLProcessor` drops the video processor and keeps the
  PIL image-processor backend. Where torchvision exists the stock class is used unchanged.
* offline builds (``random:real``, ``random:tiny``) need a tokenizer that carries the Qwen special
  tokens and chat markers. :func:`build_offline_tokenizer` trains a small byte-level BPE on a fixed
  corpus (deterministic, well under a second) so the edit template tokenizes to roughly as many
  tokens as with the real Qwen tokenizer.
"""

from __future__ import annotations

import importlib.util

from transformers import PreTrainedTokenizerFast, Qwen2VLImageProcessorPil, Qwen3VLProcessor

# The strings upstream's DreamLiteMobilePipeline formats its prompts with. Kept here because the
# tokenizer corpus and the prefix-length computation both need them.
EDIT_TEMPLATE = (
    "<|im_start|>system\nDescribe the key features of the input image (color, shape, size, "
    "texture, objects, background), then explain how the user's text instruction should alter "
    "or modify the image. Generate a new image that meets the user's requirements while maintaining "
    "consistency with the original input where appropriate.<|im_end|>\n<|im_start|>user\n"
    "<|vision_start|><|image_pad|><|vision_end|>{}<|im_end|>\n<|im_start|>assistant\n"
)
EDIT_INSTRUCTION = (
    "[Edit]: A diptych with two side-by-side images of the same scene. "
    "Compared to the right side, the left one has {}"
)
QWEN_SPECIAL_TOKENS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
    "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
]
# Upstream's prefix drop for the Qwen tokenizer (system prompt + "<|im_start|>user\n").
QWEN_EDIT_PREFIX_LEN = 64

_STYLE_WORDS = (
    "oil painting watercolor pencil sketch cartoon anime comic ink wash van gogh style starry night "
    "impressionist cubist pop art pixel art neon cyberpunk vaporwave mosaic stained glass charcoal "
    "pastel crayon woodcut engraving ukiyo-e claymation low poly origami paper cut-out felt knitted "
    "lego marble bronze statue snowy winter autumn spring summer sunset night rainy foggy golden hour "
    "make it turn into convert to look like a the an of in with and as by into on at style painting "
    "photo picture image scene video frame person dog cat horse bird car tree sky water mountain city"
)


def has_torchvision() -> bool:
    return importlib.util.find_spec("torchvision") is not None


class ImageOnlyQwen3VLProcessor(Qwen3VLProcessor):
    """``Qwen3VLProcessor`` without the video processor (which needs torchvision).

    Text + image calls behave exactly like the stock processor: ``<|image_pad|>`` is expanded to
    ``grid_t*grid_h*grid_w / merge_size**2`` tokens and ``pixel_values`` / ``image_grid_thw`` /
    ``mm_token_type_ids`` come back as usual. Only ``videos=`` is unsupported.
    """

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        # ProcessorMixin pairs positional sub-processors with ``get_attributes()``, which is read
        # off this signature (image_processor, tokenizer), so the ``None`` video processor the
        # parent passes along is dropped instead of type-checked against torchvision classes.
        super().__init__(image_processor, tokenizer, None, chat_template=chat_template, **kwargs)

    def to_dict(self):
        out = super().to_dict()
        out["processor_class"] = "Qwen3VLProcessor"  # saved folders look like the real checkpoint's
        return out


def processor_class():
    """The class used to load or build a processor on this machine."""
    return Qwen3VLProcessor if has_torchvision() else ImageOnlyQwen3VLProcessor


def build_offline_tokenizer(vocab_size: int = 2048) -> PreTrainedTokenizerFast:
    """A byte-level BPE with Qwen's special tokens, trained deterministically on a fixed corpus."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    corpus = [EDIT_TEMPLATE.format(EDIT_INSTRUCTION.format(_STYLE_WORDS)), _STYLE_WORDS] * 4
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=QWEN_SPECIAL_TOKENS, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(corpus, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
        model_max_length=32768, padding_side="right",
    )


def build_processor(tokenizer, patch_size: int, merge_size: int, temporal_patch_size: int = 2):
    """A processor with the Qwen3-VL image-processor settings (mean/std 0.5, pixel budget)."""
    image_processor = Qwen2VLImageProcessorPil(
        patch_size=patch_size, merge_size=merge_size, temporal_patch_size=temporal_patch_size,
        image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5],
        size={"shortest_edge": 65536, "longest_edge": 16777216},
    )
    return ImageOnlyQwen3VLProcessor(image_processor=image_processor, tokenizer=tokenizer)


def edit_prefix_len(tokenizer) -> int:
    """Tokens of the edit template before the image: upstream drops them from the TE output.

    Upstream hard-codes 64 for the Qwen tokenizer; other tokenizers split the system prompt
    differently, so the count is measured on the loaded tokenizer.
    """
    prefix = EDIT_TEMPLATE.split("<|vision_start|>")[0]
    return len(tokenizer(prefix, add_special_tokens=False)["input_ids"])
