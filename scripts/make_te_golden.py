"""Write tests/data/te_golden/: a tiny Qwen3-VL and the features transformers 4.57.3 gives for it.

DreamLite-mobile was trained with transformers 4.57.3 on ``hidden_states[-1]`` of the text encoder,
which in that version is the last decoder layer's output *before* the final RMSNorm (transformers
>= 5 returns the normed output there). The golden pins that convention: tests/test_te_golden.py
checks that streamedit's text encoders (exact and fast, fp32) reproduce it within 1e-5.

How the committed files were made (transformers 4.57.3 only in a scratch folder, never a project
dependency; torch from the project's venv)::

    .venv/bin/python -m pip install --no-deps --target /tmp/tf457 \\
        transformers==4.57.3 tokenizers==0.22.1 huggingface_hub==0.36.0
    PYTHONPATH=src .venv/bin/python scripts/make_te_golden.py --tf457 /tmp/tf457

Stage 1 (this process, the project's transformers): builds the model (seed 0, the offline tokenizer of
models/processor.py), saves it like a pipeline folder (``text_encoder/``, ``processor/``), the frame and the
processor inputs of both TE views, made the way their authors' code makes them (no streamedit runner
code): upstream diffusers' 512x512 LANCZOS view, ``padding=True``; the streaming paper's 256x256
BILINEAR view, ``padding="max_length", max_length=256, truncation=True``.
Stage 2 (a subprocess with ``PYTHONPATH=<tf457>``): transformers 4.57.3 loads the saved model, runs
``model(**inputs, output_hidden_states=True)`` and stores ``hidden_states[-1][:, prefix:]`` per view
in ``golden.safetensors`` (checking on the way that it is not ``last_hidden_state``).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

OUT = Path(__file__).resolve().parent.parent / "tests" / "data" / "te_golden"
PROMPT = "oil painting"
# small enough for a few hundred kB; deepstack into the first of two decoder layers, as in the tiny builds
TEXT = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, head_dim=16,
            intermediate_size=64, rope_theta=5e6, rms_norm_eps=1e-6, max_position_embeddings=4096,
            rope_scaling={"rope_type": "default", "mrope_section": [2, 3, 3], "mrope_interleaved": True})
VISION = dict(depth=2, hidden_size=16, intermediate_size=32, num_heads=1, out_hidden_size=32, patch_size=16,
              spatial_merge_size=2, temporal_patch_size=2, deepstack_visual_indexes=[0],
              num_position_embeddings=64, in_channels=3)


def golden_frame() -> np.ndarray:
    """128x128 smooth RGB content; the views are it repeated to 512 and 256 (the runners' resize is then
    the identity, so the golden tests the model path, not a resampling filter)."""
    yy, xx = np.mgrid[0:128, 0:128].astype(np.float64)
    return np.stack([127 + 120 * np.sin(xx / 9.0 + yy / 23.0), 127 + 120 * np.cos(yy / 11.0),
                     255.0 * ((xx + 2 * yy) % 128) / 128], -1).astype(np.uint8)


def view(frame: np.ndarray, size: int) -> np.ndarray:
    k = size // frame.shape[0]
    return np.repeat(np.repeat(frame, k, 0), k, 1)


def stage1(tf457: str) -> None:
    from PIL import Image
    from transformers import Qwen3VLForConditionalGeneration

    from streamedit.models import processor as proc
    from streamedit.models.architectures import _te_config

    tok = proc.build_offline_tokenizer()
    torch.manual_seed(0)
    te = Qwen3VLForConditionalGeneration(_te_config(tok, dict(TEXT, vocab_size=len(tok)), VISION)).eval()
    with torch.no_grad():  # the library initialises these to 1 / 0: make every parameter matter
        te.model.language_model.norm.weight.normal_(1.0, 0.5)
        te.model.visual.patch_embed.proj.bias.normal_(0, 0.5)
    processor = proc.build_processor(tok, VISION["patch_size"], VISION["spatial_merge_size"])
    OUT.mkdir(parents=True, exist_ok=True)
    te = te.half().float()  # stored as float16 (size); both stages load the same values into float32
    te.to(torch.float16).save_pretrained(OUT / "text_encoder")
    processor.save_pretrained(OUT / "processor")
    frame = golden_frame()
    Image.fromarray(frame).save(OUT / "frame.png")
    text = proc.EDIT_TEMPLATE.format(proc.EDIT_INSTRUCTION.format(PROMPT))
    inputs = {}
    for size, resample, pad in ((512, Image.LANCZOS, dict(padding=True)),
                                (256, Image.BILINEAR, dict(padding="max_length", max_length=256, truncation=True))):
        image = Image.fromarray(view(frame, size)).resize((size, size), resample)
        out = processor(text=[text], images=[image], return_tensors="pt", **pad)
        inputs[size] = {k: out[k] for k in ("input_ids", "attention_mask", "pixel_values", "image_grid_thw")}
    prefix = proc.edit_prefix_len(tok)
    with tempfile.TemporaryDirectory() as tmp:
        config = json.loads((OUT / "text_encoder" / "config.json").read_text())
        ids = {k: config[k] for k in ("image_token_id", "video_token_id", "vision_start_token_id",
                                      "vision_end_token_id")}
        torch.save({"inputs": inputs, "prefix": prefix, "vocab": len(tok), "ids": ids}, Path(tmp) / "inputs.pt")
        env = dict(os.environ, PYTHONPATH=tf457)
        subprocess.run([sys.executable, __file__, "--stage2", tmp], check=True, env=env)
        golden = torch.load(Path(tmp) / "golden.pt")
    from safetensors.torch import save_file

    tensors = {"input_ids_512": inputs[512]["input_ids"], "input_ids_256": inputs[256]["input_ids"],
               "mask_256": inputs[256]["attention_mask"][:, prefix:].contiguous(),
               "features_512": golden["features"][512], "features_256": golden["features"][256]}
    meta = {"prompt": PROMPT, "prefix": str(prefix), "transformers": golden["version"],
            "made_by": "scripts/make_te_golden.py"}
    save_file(tensors, OUT / "golden.safetensors", metadata=meta)
    total = sum(p.stat().st_size for p in OUT.rglob("*") if p.is_file())
    print(json.dumps({**meta, "bytes": total, "shapes": {k: list(v.shape) for k, v in tensors.items()}}))


def stage2(tmp: str) -> None:
    import transformers
    from safetensors.torch import load_file
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

    if transformers.__version__ != "4.57.3":
        raise SystemExit(f"stage 2 needs transformers 4.57.3 (PYTHONPATH=<its target folder>), "
                         f"got {transformers.__version__}")
    saved = torch.load(Path(tmp) / "inputs.pt")
    prefix = saved["prefix"]
    # the 5.x config.json names the rope settings differently: rebuild the config from the same values
    config = Qwen3VLConfig(text_config=dict(TEXT, vocab_size=saved["vocab"]), vision_config=VISION,
                           tie_word_embeddings=True, **saved["ids"])
    model = Qwen3VLForConditionalGeneration(config).eval()
    state = {k: v.float() for k, v in load_file(OUT / "text_encoder" / "model.safetensors").items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert set(missing) <= {"lm_head.weight"} and not unexpected, (missing, unexpected)
    model.tie_weights()
    features = {}
    with torch.no_grad():
        for size, inputs in saved["inputs"].items():
            out = model(**inputs, output_hidden_states=True)
            last = out.hidden_states[-1]
            normed = model.model.language_model.norm(last)
            post = model.model(**inputs).last_hidden_state
            assert torch.allclose(normed, post, atol=1e-5) and not torch.allclose(last, post, atol=1e-2)
            features[size] = last[:, prefix:].contiguous()
    torch.save({"features": features, "version": transformers.__version__}, Path(tmp) / "golden.pt")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tf457", help="folder holding transformers 4.57.3 (pip install --target)")
    parser.add_argument("--stage2", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.stage2:
        stage2(args.stage2)
    elif args.tf457:
        stage1(args.tf457)
    else:
        parser.error("--tf457 is required")
