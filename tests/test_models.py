"""Loading: save_pretrained round trips through the folder path and the hub-id path, clear errors."""

import json
import shutil

import numpy as np
import pytest
import torch

from streamedit import EngineConfig, StreameditError, StreamEngine, load_models
from streamedit.models import COMPONENTS, hook_split


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
    from streamedit import processor as proc

    models = load_models("random:tiny", device="cpu", dtype=torch.float32)
    models.save_pretrained(tmp_path / "m")
    monkeypatch.setattr(proc, "has_torchvision", lambda: True)
    loaded = load_models(str(tmp_path / "m"), device="cpu", dtype=torch.float32)
    assert isinstance(loaded.processor, proc.ImageOnlyQwen3VLProcessor)
