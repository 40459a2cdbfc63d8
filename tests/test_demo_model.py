"""The bundled demo model and its temporal adapter (src/streamedit/assets, trained by `streamedit train base/lllite`)."""

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from streamedit import EngineConfig, StreamEngine, load_models
from streamedit.cli.group import cli
from streamedit.eval.metrics import psnr_per_frame
from streamedit.models.loading import DEMO_LLLITE, demo_available
from streamedit.train.filters import STYLES, apply_style
from streamedit.video.clips import make_test_clip, read_frames

pytestmark = pytest.mark.skipif(not demo_available(), reason="the demo model is not bundled in this checkout")


@pytest.fixture(scope="module")
def demo():
    return load_models("demo", device="cpu", dtype=torch.float32)


@pytest.fixture(scope="module")
def scene(tmp_path_factory):
    # the demo model's own working size: it was trained at 256 px only
    path = make_test_clip(tmp_path_factory.mktemp("clip") / "scene.mp4", frames=8, width=256, height=256)
    return list(read_frames(path, size=256))


def test_demo_folder_describes_itself(demo):
    assert demo.extras["instructions"] == list(STYLES)
    assert 0 < demo.extras["strength"] < 1
    assert type(demo.unet).__name__ == "DreamLiteUNetModel" and type(demo.vae).__name__ == "AutoencoderTiny"
    # trained on the TE's normed output (last_hidden_state), unlike DreamLite: its streamedit.json says so
    assert demo.te_features == demo.extras["te_features"] == "normed"


def test_demo_model_imitates_the_sketch_filter(demo, scene):
    """Real behaviour: the output is far closer to the filter than the input is (a random model is not)."""
    engine = StreamEngine(demo, EngineConfig(prompt="pencil sketch", batch_size=4, size=256, fixed_noise=True))
    out = np.stack(list(engine.run(scene)))
    target = np.stack([apply_style("pencil sketch", f) for f in scene])
    model_psnr = np.mean(psnr_per_frame(out, target))
    input_psnr = np.mean(psnr_per_frame(np.stack(scene), target))
    assert model_psnr > input_psnr + 5.0, (model_psnr, input_psnr)
    # the instruction matters: another style's output is further from this filter
    other = np.stack(list(StreamEngine(demo, EngineConfig(prompt="cartoon", batch_size=4, size=256,
                                                         fixed_noise=True)).run(scene)))
    assert np.mean(psnr_per_frame(other, target)) < model_psnr - 2.0


def test_lllite_demo_selects_the_bundled_adapter(demo, scene):
    base = list(StreamEngine(demo, EngineConfig(prompt="oil painting", batch_size=4, size=256, fixed_noise=True))
                .run(scene))
    engine = StreamEngine(demo, EngineConfig(prompt="oil painting", batch_size=4, size=256, fixed_noise=True,
                                             lllite="demo", cond_refresh_every=1))
    assert len(engine.adapter.hooks) == 55 and DEMO_LLLITE.is_file()  # every hook in the file: all 55 of the demo U-Net
    adapted = list(engine.run(scene))
    engine.close()
    assert any(not np.array_equal(a, b) for a, b in zip(base, adapted))


def test_stylize_cli_with_the_demo_model_and_adapter(tmp_path):
    clip = make_test_clip(tmp_path / "in.mp4", frames=6, width=96, height=96)
    out = tmp_path / "out.mp4"
    result = CliRunner().invoke(cli, ["stylize", str(clip), "-o", str(out), "-p", "watercolor", "--model", "demo",
                                      "--size", "128", "--batch", "2", "--lllite", "demo", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert len(read_frames(out)) == 6


def test_stylize_defaults_to_the_models_native_size(tmp_path):
    from streamedit.models.loading import native_size

    assert native_size("demo") == 256 and native_size("random:tiny") is None
    (tmp_path / "streamedit.json").write_text('{"size": 128}')
    assert native_size(str(tmp_path)) == 128
    clip = make_test_clip(tmp_path / "in.mp4", frames=4, width=96, height=96)
    out = tmp_path / "out.mp4"
    result = CliRunner().invoke(cli, ["stylize", str(clip), "-o", str(out), "-p", "cartoon", "--model", "demo",
                                      "--keep-size", "--batch", "4", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert read_frames(out)[0].shape == (256, 256, 3)  # --keep-size writes the working size


def test_eval_defaults_to_the_models_native_size(tmp_path):
    import json

    clip = make_test_clip(tmp_path / "c.mp4", frames=4, width=64, height=64)
    result = CliRunner().invoke(cli, ["eval", "--clips", str(clip), "-p", "oil painting", "--out", str(tmp_path / "e"),
                                      "--model", "demo", "--device", "cpu", "--batch", "4"])
    assert result.exit_code == 0, result.output
    record = json.loads((tmp_path / "e" / "metrics.jsonl").read_text().splitlines()[0])
    assert record["run"]["config"]["size"] == 256


def test_strength_out_of_range_is_one_clear_error(tmp_path):
    clip = make_test_clip(tmp_path / "in.mp4", frames=2, width=64, height=64)
    result = CliRunner().invoke(cli, ["stylize", str(clip), "-o", str(tmp_path / "o.mp4"), "-p", "cartoon",
                                      "--strength", "1.5"])
    assert result.exit_code == 2 and "--strength" in result.output and "Traceback" not in result.output
