"""The text-encoder features DreamLite was trained on, pinned by a transformers 4.57.3 golden.

tests/data/te_golden (scripts/make_te_golden.py says how it was made): a tiny Qwen3-VL saved like a
pipeline's ``text_encoder/`` and ``processor/``, a frame, and what transformers 4.57.3 returns as
``hidden_states[-1][:, prefix:]`` for upstream's 512 view and the paper's padded 256 view. That is the
last decoder layer's output before the final norm; transformers >= 5 (this project's) returns the
normed output there, so the engine must not read ``hidden_states[-1]`` / ``last_hidden_state``.
"""

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from transformers import Qwen3VLForConditionalGeneration

from streamedit.models import processor as proc
from streamedit.models.loading import _load_processor
from streamedit.text.exact import TextEncoderRunner
from streamedit.text.fast import FastTextEncoderRunner

GOLDEN = Path(__file__).parent / "data" / "te_golden"
TOL = 1e-5


@pytest.fixture(scope="module")
def golden():
    with safe_open(str(GOLDEN / "golden.safetensors"), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


@pytest.fixture(scope="module")
def golden_models(tiny_models):
    """The golden's text encoder and processor, loaded as the engine's loader loads a pipeline folder's."""
    te = Qwen3VLForConditionalGeneration.from_pretrained(GOLDEN / "text_encoder", dtype=torch.float32).eval()
    processor = _load_processor(str(GOLDEN))
    return dataclasses.replace(tiny_models, text_encoder=te, tokenizer=processor.tokenizer, processor=processor,
                               edit_prefix_len=proc.edit_prefix_len(processor.tokenizer))


def _view(size):
    frame = np.asarray(Image.open(GOLDEN / "frame.png").convert("RGB"))
    k = size // frame.shape[0]
    return np.repeat(np.repeat(frame, k, 0), k, 1)


def test_golden_was_made_by_transformers_4_57(golden, golden_models):
    tensors, meta = golden
    assert meta["transformers"] == "4.57.3" and int(meta["prefix"]) == golden_models.edit_prefix_len
    # the same token ids as the golden's inputs (the 256 view: right-padded to 256 with the pad token)
    for size in (512, 256):
        ids = TextEncoderRunner(golden_models, te_size=size).text_inputs(meta["prompt"])["input_ids"]
        assert torch.equal(ids, tensors[f"input_ids_{size}"])


@pytest.mark.parametrize("te_size", [512, 256])
@pytest.mark.parametrize("runner", [TextEncoderRunner, FastTextEncoderRunner])
def test_engine_features_equal_the_4_57_golden(golden, golden_models, runner, te_size):
    tensors, meta = golden
    te = runner(golden_models, te_size=te_size)
    ours = te.encode(meta["prompt"], te.prepare_images([_view(te_size)]), 1)
    ref = tensors[f"features_{te_size}"]
    assert ours.dtype == torch.float32 and ours.shape == ref.shape
    real = ref.shape[1]
    if te_size == 256:  # pad rows: the U-Net masks them (ours are zeros); the mask is the golden's
        mask = te.text_mask(meta["prompt"])
        assert torch.equal(mask, tensors["mask_256"])
        real = int(mask.sum())
        assert not ours[:, real:].any()
    assert (ours[:, :real] - ref[:, :real]).abs().max() <= TOL
    # the normed output (transformers 5's hidden_states[-1]) is far from it: the test can fail
    norm = golden_models.text_encoder.model.language_model.norm
    assert (norm(ref[:, :real]) - ref[:, :real]).abs().max() > 0.5
