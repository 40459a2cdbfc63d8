"""`streamedit train base` on CPU at toy sizes: data, filters, the saved folder, and the model it loads."""

import json
import logging

import numpy as np
import pytest
from click.testing import CliRunner

from streamedit.cli import cli
from streamedit.clips import make_test_clip
from streamedit.engine import EngineConfig, StreamEngine
from streamedit.eval.metrics import psnr_per_frame
from streamedit.models import load_models
from streamedit.train.base import BaseTrainConfig, train_base
from streamedit.train.data import build_examples, split_clips
from streamedit.train.filters import STYLES, apply_style


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("clips")
    for i, name in enumerate(("train_a", "held")):
        make_test_clip(root / f"{name}.mp4", frames=6, width=96, height=80, seed=i)
    return root


def test_filters_are_deterministic_and_distinct():
    rng = np.random.default_rng(0)
    frame = (rng.random((64, 64, 3)) * 255).astype(np.uint8)
    outs = {name: apply_style(name, frame) for name in STYLES}
    for name, out in outs.items():
        assert out.shape == frame.shape and out.dtype == np.uint8
        assert np.array_equal(out, apply_style(name, frame))
    names = list(outs)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            assert not np.array_equal(outs[a], outs[b])
    sketch = outs["pencil sketch"]
    assert np.array_equal(sketch[..., 0], sketch[..., 2])  # gray


def test_split_and_examples(clip_dir):
    train, held = split_clips(clip_dir, ["held"])
    assert [p.stem for p in train] == ["train_a"] and [p.stem for p in held] == ["held"]
    with pytest.raises(Exception, match="not in"):
        split_clips(clip_dir, ["nope"])
    sources, targets = build_examples(train, 32, 2, seed=0, workers=1)
    assert sources.shape == (12, 32, 32, 3) and targets.shape == (12, len(STYLES), 32, 32, 3)
    for k, name in enumerate(STYLES):  # a target is exactly the filter of its (augmented) source
        assert np.array_equal(targets[3, k], apply_style(name, sources[3]))


def test_train_base_saves_a_loadable_demo_folder(clip_dir, tmp_path, caplog):
    cfg = BaseTrainConfig(size=64, crops_per_frame=1, vae_steps=4, vae_batch=2, unet_steps=6, unet_batch=4,
                          pixel_batch=2, workers=1)
    out = tmp_path / "demo"
    report = train_base(str(clip_dir), str(out), ["held"], cfg, "cpu", progress=False)
    meta = json.loads((out / "streamedit.json").read_text())
    assert (out / "unet").is_dir() and meta["instructions"] == list(STYLES) and meta["strength"] == cfg.strength
    assert set(report["validation"]) >= set(STYLES) | {"vae_roundtrip_psnr", "mean_psnr"}
    losses = [r["loss"] for r in report["log"] if r["phase"] == "unet"]
    assert losses and all(np.isfinite(losses))
    models = load_models(str(out))
    assert models.vae.config.latent_channels == 8
    assert models.vae.config.scaling_factor == pytest.approx(report["scaling_factor"], rel=1e-3)
    # the validation PSNR was measured with the same engine path the saved folder runs through
    frames = [np.full((64, 64, 3), 90, np.uint8)] * 2
    with caplog.at_level(logging.WARNING):
        engine = StreamEngine(models, EngineConfig(prompt="starry night", batch_size=2, size=64, pipeline=False))
    assert "trained on these instructions only" in caplog.text
    assert len(list(engine.run(frames))) == 2
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        engine.set_prompt("Oil Painting")
    assert "trained on these instructions only" not in caplog.text


def test_psnr_per_frame():
    a = np.zeros((2, 4, 4, 3), np.uint8)
    b = a.copy()
    b[1] = 255
    out = psnr_per_frame(a, b)
    assert np.isinf(out[0]) and out[1] == pytest.approx(0.0)


def test_train_base_cli_bad_folder(tmp_path):
    result = CliRunner().invoke(cli, ["train", "base", "--clips", str(tmp_path / "none"), "-o", str(tmp_path / "o"),
                                      "--device", "cpu"])
    assert result.exit_code == 2 and "does not exist" in result.output
