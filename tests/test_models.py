"""Loading: save_pretrained round trips through the folder path and the hub-id path, clear errors."""

import json
import shutil

import numpy as np
import pytest
import torch

from streamedit import EngineConfig, StreameditError, StreamEngine, load_models
from streamedit.models.components import COMPONENTS
from streamedit.temporal.hooks import hook_split


def _outputs(models, frames):
    cfg = EngineConfig(prompt="oil painting", batch_size=2, size=64, seed=0, fixed_noise=True)
    return list(StreamEngine(models, cfg).run(frames[:4]))


@pytest.fixture(scope="module")
def saved(tmp_path_factory, tiny_models):
    path = tmp_path_factory.mktemp("tiny") / "pipe"
    tiny_models.save_pretrained(path)
    return path


def test_saved_folder_looks_like_the_published_checkpoint(saved):
    index = json.loads((saved / "model_index.json").read_text())
    assert index["_class_name"] == "DreamLiteMobilePipeline"
    assert index["processor"] == ["transformers", "Qwen3VLProcessor"]
    assert all((saved / c).is_dir() for c in COMPONENTS)


def test_folder_round_trip_is_exact(saved, tiny_models, frames):
    loaded = load_models(str(saved), device="cpu", dtype=torch.float32)
    assert loaded.edit_prefix_len == tiny_models.edit_prefix_len
    for name in ("unet", "vae", "text_encoder"):
        a, b = getattr(tiny_models, name).state_dict(), getattr(loaded, name).state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert all(np.array_equal(x, y) for x, y in zip(_outputs(tiny_models, frames), _outputs(loaded, frames)))


def test_hub_id_round_trip_through_the_cache(saved, tiny_models, frames, tmp_path, monkeypatch):
    """A hub id resolves through huggingface_hub's cache layout, then loads like a folder."""
    from huggingface_hub import constants

    commit = "0" * 40
    repo = tmp_path / "hub" / "models--someone--tiny-dreamlite"
    shutil.copytree(saved, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    loaded = load_models("someone/tiny-dreamlite", device="cpu", dtype=torch.float32)
    assert all(np.array_equal(x, y) for x, y in zip(_outputs(tiny_models, frames), _outputs(loaded, frames)))


def test_hub_id_offline_fails_fast_with_one_message(monkeypatch, tmp_path):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(StreameditError, match="not in the local Hugging Face cache"):
        load_models("someone/absent", device="cpu")


def test_missing_component_is_named(saved, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(saved, broken)
    shutil.rmtree(broken / "vae")
    with pytest.raises(StreameditError, match="missing component\\(s\\): vae"):
        load_models(str(broken))
    (broken / "model_index.json").unlink()
    with pytest.raises(StreameditError, match="no model_index.json"):
        load_models(str(broken))


def test_unknown_sources():
    for bad in ("random:huge", "not a model", "a/b/c"):
        with pytest.raises(StreameditError, match="unknown model source"):
            load_models(bad)


def test_random_real_architecture_on_meta():
    models = load_models("random:real", device="meta", dtype=torch.bfloat16)
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert round(count(models.unet) / 1e9, 3) == 0.390
    assert round(count(models.text_encoder) / 1e9, 3) == 2.128
    assert hook_split(models.unet) == {"down": 38, "mid": 16, "up": 54}
    assert models.edit_prefix_len == 64
    text = models.text_encoder.config.text_config
    assert (text.hidden_size, text.num_hidden_layers, text.num_key_value_heads, text.vocab_size) == (2048, 28, 8, 151936)


def test_folder_without_video_processor_loads_where_torchvision_exists(tmp_path, monkeypatch):
    """The stock Qwen3VLProcessor (chosen when torchvision is installed) needs a video processor
    config that streamedit's own folders do not carry: loading falls back to the image-only one."""
    from streamedit.models import processor as proc

    models = load_models("random:tiny", device="cpu", dtype=torch.float32)
    models.save_pretrained(tmp_path / "m")
    monkeypatch.setattr(proc, "has_torchvision", lambda: True)
    loaded = load_models(str(tmp_path / "m"), device="cpu", dtype=torch.float32)
    assert isinstance(loaded.processor, proc.ImageOnlyQwen3VLProcessor)


LEGACY_BLOCKS = {  # the names the published unet/config.json uses (diffusers maps them to the DreamLite blocks)
    "down_block_types": ["CrossAttnDownRemoveSelfAttnBlock2D", "CrossAttnDownRemoveSelfAttnBlock2D",
                         "CrossAttnDownBlock2D"],
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpRemoveSelfAttnBlock2DV1", "UpBlock2D"],
}


def _hub_layout(models, path):
    """A folder laid out like carlofkl/DreamLite-mobile, revision ``diffusers`` (saved with transformers 4.57):
    legacy block names in unet/config.json, a 4.57 text-encoder config, Qwen3-VL-2B's processor files
    (the fast image processor's preprocessor_config.json and a video processor config) in processor/."""
    models.save_pretrained(path)
    unet = path / "unet" / "config.json"
    unet.write_text(json.dumps({**json.loads(unet.read_text()), **LEGACY_BLOCKS}, indent=2))
    te = path / "text_encoder" / "config.json"
    config = json.loads(te.read_text())
    text = config["text_config"]
    rope = text.pop("rope_parameters")
    text["rope_theta"] = rope.pop("rope_theta")
    text["rope_scaling"] = rope
    config["torch_dtype"] = config.pop("dtype")
    config["transformers_version"] = "4.57.3"
    te.write_text(json.dumps(config, indent=2))
    index = path / "model_index.json"
    index.write_text(json.dumps({**json.loads(index.read_text()), "tokenizer": ["transformers", "Qwen2TokenizerFast"]}))
    proc_dir = path / "processor"
    ip = json.loads((proc_dir / "processor_config.json").read_text())["image_processor"]
    (proc_dir / "processor_config.json").unlink()
    common = {k: ip[k] for k in ("patch_size", "temporal_patch_size", "merge_size", "image_mean", "image_std", "size")}
    (proc_dir / "preprocessor_config.json").write_text(json.dumps(
        {**common, "processor_class": "Qwen3VLProcessor", "image_processor_type": "Qwen2VLImageProcessorFast"}))
    (proc_dir / "video_preprocessor_config.json").write_text(json.dumps(
        {**common, "processor_class": "Qwen3VLProcessor", "video_processor_type": "Qwen3VLVideoProcessor"}))
    return path


def test_the_paper_te_view_leaves_the_tokenizer_as_it_was(tiny_models, tmp_path):
    """te_size 256 pads/truncates the prompt to 256 tokens; the tokenizer must not keep that setting, or a
    folder saved afterwards truncates every 512-view prompt (its image tokens) when loaded."""
    from streamedit.text.exact import TextEncoderRunner

    TextEncoderRunner(tiny_models, te_size=256).text_inputs("oil painting")
    tiny_models.save_pretrained(tmp_path / "pipe")
    saved = json.loads((tmp_path / "pipe" / "processor" / "tokenizer.json").read_text())
    assert saved["truncation"] is None and saved["padding"] is None
    loaded = load_models(str(tmp_path / "pipe"), device="cpu", dtype=torch.float32)
    ids = TextEncoderRunner(loaded, te_size=512).text_inputs("oil painting")["input_ids"]
    assert torch.equal(ids, TextEncoderRunner(tiny_models, te_size=512).text_inputs("oil painting")["input_ids"])


def test_streamedit_json_names_the_feature_convention(saved, tmp_path):
    """A folder without the key is DreamLite's (pre-norm); one that names "normed" gets that convention;
    a value we do not know is refused with one message naming the file."""
    assert load_models(str(saved), device="cpu", dtype=torch.float32).te_features == "prenorm"
    folder = tmp_path / "pipe"
    shutil.copytree(saved, folder)
    meta = folder / "streamedit.json"
    meta.write_text(json.dumps({"te_features": "normed"}))
    assert load_models(str(folder), device="cpu", dtype=torch.float32).te_features == "normed"
    meta.write_text(json.dumps({"te_features": "hidden_states[-2]"}))
    with pytest.raises(StreameditError, match="te_features must be one of prenorm, normed"):
        load_models(str(folder), device="cpu", dtype=torch.float32)


def test_loads_a_folder_laid_out_like_the_hub_branch(tmp_path, tiny_models, frames):
    path = _hub_layout(tiny_models, tmp_path / "DreamLite-mobile")
    assert json.loads((path / "unet" / "config.json").read_text())["mid_block_type"] == "UNetMidBlock2DCrossAttn"
    loaded = load_models(str(path), device="cpu", dtype=torch.float32)
    assert [type(b).__name__ for b in loaded.unet.down_blocks] == [
        "DreamLiteCrossAttnNoSelfAttnDownBlock2D", "DreamLiteCrossAttnNoSelfAttnDownBlock2D",
        "DreamLiteCrossAttnDownBlock2D"]
    assert type(loaded.unet.mid_block).__name__ == "DreamLiteUNetMidBlock2DCrossAttn"
    assert hook_split(loaded.unet) == hook_split(tiny_models.unet)
    assert loaded.edit_prefix_len == tiny_models.edit_prefix_len
    assert loaded.text_encoder.config.text_config.rope_parameters["mrope_section"] == [2, 3, 3]
    for name in ("unet", "vae", "text_encoder"):
        a, b = getattr(tiny_models, name).state_dict(), getattr(loaded, name).state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert all(np.array_equal(x, y) for x, y in zip(_outputs(tiny_models, frames), _outputs(loaded, frames)))
