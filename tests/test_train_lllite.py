"""`streamedit train pairs | lllite`: teacher pairs, the flow-matching conventions, training, CLI (CPU, tiny)."""

from __future__ import annotations

import importlib.util
import json

import cv2
import numpy as np
import pytest
import torch
from click.testing import CliRunner

from streamedit.cli.group import cli
from streamedit.diffusion.denoiser import Denoiser
from streamedit.errors import StreameditError
from streamedit.models.loading import load_models
from streamedit.temporal.adapter import LLLiteAdapter
from streamedit.temporal.conditioner import farneback
from streamedit.train.augment import encode_latents
from streamedit.train.lllite import sigma_schedule, train_lllite
from streamedit.train.pairs import MANIFEST, blend_clip, find_clips, load_pair_file, make_pairs
from streamedit.video.clips import make_test_clip

SIZE, ALPHA, FRAMES = 64, 0.7, 6
PROMPTS = ["oil painting", "pencil sketch"]
TINY_CPU = ["--model", "random:tiny", "--device", "cpu"]


@pytest.fixture(scope="module")
def models():
    return load_models("random:tiny", device="cpu", dtype=torch.float32)


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    d = tmp_path_factory.mktemp("clips")
    make_test_clip(d / "a.mp4", frames=FRAMES, width=80, height=64)
    make_test_clip(d / "held_out.mp4", frames=4, width=64, height=64, pattern="static")
    return d


@pytest.fixture(scope="module")
def pairs(models, clips, tmp_path_factory):
    out = tmp_path_factory.mktemp("pairs")
    summary = make_pairs(models, find_clips([clips], exclude=["held_out"]), PROMPTS, out, size=SIZE, alpha=ALPHA,
                         batch_size=4, progress=False)
    return out, summary


def _remap(img: np.ndarray, flow: np.ndarray) -> np.ndarray:
    """out(x) = img(x + flow(x)), bilinear, border clamp: an OpenCV warp independent of temporal.warp."""
    h, w = flow.shape[:2]
    xs, ys = np.meshgrid(np.arange(w, dtype=np.float32), np.arange(h, dtype=np.float32))
    return cv2.remap(img.astype(np.float32), xs + flow[..., 0], ys + flow[..., 1], cv2.INTER_LINEAR,
                     borderMode=cv2.BORDER_REPLICATE)


def test_find_clips_folders_files_exclude(clips):
    assert [c.name for c in find_clips([clips])] == ["a.mp4", "held_out.mp4"]
    assert [c.name for c in find_clips([clips / "a.mp4", clips], exclude=["held_out.mp4"])] == ["a.mp4", "a.mp4"]
    with pytest.raises(StreameditError, match="no such file"):
        find_clips([clips / "missing.mp4"])
    with pytest.raises(StreameditError, match="no video clips"):
        find_clips([clips], exclude=["a", "held_out"])


def test_pairs_files_shapes_and_manifest(pairs):
    out, summary = pairs
    manifest = json.loads((out / MANIFEST).read_text())
    assert summary["frames"] == FRAMES * len(PROMPTS) and len(summary["files"]) == len(PROMPTS)
    assert [f["prompt"] for f in manifest["files"]] == PROMPTS and manifest["size"] == SIZE
    for entry in manifest["files"]:
        arrays, meta = load_pair_file(out / entry["file"])
        assert meta["prompt"] == entry["prompt"] and meta["alpha"] == ALPHA and meta["frames"] == FRAMES
        for k in ("source", "cond", "target", "teacher"):
            assert arrays[k].shape == (FRAMES, SIZE, SIZE, 3) and arrays[k].dtype == np.uint8, k
        assert arrays["start"].tolist() == [1] + [0] * (FRAMES - 1)  # one shot: only frame 0 restarts
        assert np.array_equal(arrays["cond"][0], arrays["source"][0])  # first cond = the input frame
        assert np.array_equal(arrays["target"][0], arrays["teacher"][0])  # first target = y_0
        assert not np.array_equal(arrays["teacher"][0], arrays["source"][0])  # a real model output
    a, _ = load_pair_file(out / manifest["files"][0]["file"])
    b, _ = load_pair_file(out / manifest["files"][1]["file"])
    assert np.array_equal(a["source"], b["source"]) and not np.array_equal(a["teacher"], b["teacher"])


def test_pairs_target_and_cond_recomputed(pairs):
    out, summary = pairs
    arrays, _ = load_pair_file(out / summary["files"][0])
    src, teacher, target, cond = (arrays[k].astype(np.float32) for k in ("source", "teacher", "target", "cond"))
    for t in (1, FRAMES - 1):
        flow = farneback(arrays["source"][t], arrays["source"][t - 1])  # frame t's grid -> frame t-1
        expected_target = ALPHA * teacher[t] + (1 - ALPHA) * _remap(target[t - 1], flow)
        expected_cond = _remap(teacher[t - 1], flow)
        # OpenCV's fixed-point bilinear weights differ from grid_sample by < 1 level; rounding adds 1.
        assert np.abs(target[t] - expected_target).max() <= 2 and np.abs(target[t] - expected_target).mean() < 0.6
        assert np.abs(cond[t] - expected_cond).max() <= 2 and np.abs(cond[t] - expected_cond).mean() < 0.6
    assert src.shape[0] == FRAMES


def test_blend_formula_on_varied_teacher_and_cut_restart(tmp_path):
    """The tiny model's teacher barely changes over frames; random teachers make the blend visible."""
    from streamedit.video.io import open_video

    clip = make_test_clip(tmp_path / "cut.mp4", frames=8, width=64, height=64, pattern="cut", cut_at=5)
    frames = np.stack(list(open_video(clip, size=SIZE).frames()))
    teacher = np.random.default_rng(0).integers(0, 256, frames.shape, dtype=np.uint8)
    out = blend_clip(frames, teacher, ALPHA)
    assert out["start"].tolist() == [1, 0, 0, 0, 0, 1, 0, 0]  # the cut restarts cond and target
    for t in (0, 5):
        assert np.array_equal(out["cond"][t], frames[t]) and np.array_equal(out["target"][t], teacher[t])
    t = 3
    flow = farneback(frames[t], frames[t - 1])
    expected = ALPHA * teacher[t].astype(np.float32) + (1 - ALPHA) * _remap(out["target"][t - 1], flow)
    assert np.abs(out["target"][t] - expected).max() <= 2
    assert np.abs(out["target"][t].astype(np.float32) - teacher[t]).mean() > 10  # the blend does something
    assert np.abs(out["cond"][t] - _remap(teacher[t - 1], flow)).max() <= 2


def test_timesteps_match_the_runtime(models):
    for steps in (1, 2, 3, 4):
        sigmas, timesteps = sigma_schedule(models, SIZE, np.linspace(1.0, 1 / steps, steps))
        den = Denoiser(models, steps, SIZE)
        assert torch.equal(timesteps.to(den.timesteps.dtype), den.timesteps)
        dts = torch.stack([d.float() for d in den.dts])
        assert torch.allclose(torch.diff(torch.cat([sigmas, torch.zeros(1)])), dts, atol=1e-6)
    sigmas, timesteps = sigma_schedule(models, SIZE, np.linspace(1.0, 1 / 1000, 1000))
    assert sigmas[0] == 1.0 and timesteps[0] == 1000.0  # the 1-step operating point
    assert torch.allclose(timesteps, sigmas * 1000) and bool((torch.diff(sigmas) < 0).all())


def test_clean_latents_invert_decode(frames):
    m = load_models("random:tiny", device="cpu", dtype=torch.float32)
    m.vae.register_to_config(scaling_factor=0.7, shift_factor=0.2)  # non-trivial, so a wrong formula shows
    den = Denoiser(m, 1, SIZE)
    x = torch.from_numpy(np.stack(frames[:2]))
    z0 = encode_latents(den, x, clean=True)
    with torch.no_grad():
        raw = m.vae.encode(x.permute(0, 3, 1, 2).float() / 127.5 - 1).latents
        direct = ((m.vae.decode(raw).sample / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1)
    assert torch.equal(den.decode(z0), direct)
    assert torch.allclose(encode_latents(den, x, clean=False), raw)
    assert not torch.allclose(z0, raw)


def _unet_state(unet):
    return {k: v.clone() for k, v in unet.state_dict().items()}


def test_train_overfits_one_example_and_checkpoints(models, clips, tmp_path):
    one = tmp_path / "one"
    make_pairs(models, [clips / "a.mp4"], PROMPTS[:1], one, size=SIZE, max_frames=1, progress=False)
    before = _unet_state(models.unet)
    out, log = tmp_path / "ad.safetensors", tmp_path / "loss.jsonl"
    s = train_lllite(models, one, out, steps=20, batch_size=2, lr=1e-3, p_one=1.0, fixed_noise=True, seed=0,
                     save_every=10, log_path=log, te_cache_gb=0.01, progress=False)
    assert s["steps"] == 20 and len(s["losses"]) == 20
    assert s["final_loss"] < s["losses"][10] < s["first_loss"], s["losses"]  # fixed objective: steady descent
    lines = [json.loads(x) for x in log.read_text().splitlines()]
    assert [x["step"] for x in lines] == list(range(1, 21)) and lines[-1]["loss"] == s["final_loss"]
    assert [p.rsplit("/", 1)[-1] for p in s["checkpoints"]] == ["ad-step000010.safetensors"]
    trained = s["adapter"].state_dict()
    loaded = LLLiteAdapter.load(out, models.unet).state_dict()
    assert trained.keys() == loaded.keys() and all(torch.equal(trained[k], loaded[k]) for k in trained)
    assert any(v.abs().sum() > 0 for k, v in trained.items() if ".up." in k)  # zero-init up has moved
    mid = LLLiteAdapter.load(s["checkpoints"][0], models.unet).state_dict()
    assert any(not torch.equal(mid[k], trained[k]) for k in trained)
    # The U-Net is left as found: same weights, unpatched, trainability restored.
    after = _unet_state(models.unet)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not any("forward" in vars(m) for m in models.unet.modules())


def test_train_with_grad_accum_and_random_sigmas(models, pairs, tmp_path):
    s = train_lllite(models, pairs[0], tmp_path / "a.safetensors", hooks="all", steps=2, batch_size=2,
                     grad_accum=2, p_one=0.5, cond_emb_dim=16, mlp_dim=32, progress=False)
    assert s["prompts"] == 2 and s["frames"] == 2 * FRAMES and np.isfinite(s["final_loss"])
    assert LLLiteAdapter.load(tmp_path / "a.safetensors", models.unet).config.cond_emb_dim == 16


def test_pixel_loss_reads_the_decoded_one_step_output(models, pairs):
    """At the exact velocity the 1-step output is the target latent, so the pixel loss is the image loss of
    its decode against the target frame; only the operating-point examples count."""
    import contextlib

    from streamedit.train.common import image_loss, to_pm1
    from streamedit.train.lllite import _pixel_loss, load_pairs

    data = load_pairs(pairs[0])
    den = Denoiser(models, 1, SIZE)
    idx = torch.tensor([0, 3, 5])
    z0 = encode_latents(den, data.target[idx], clean=True)
    noise = torch.randn(z0.shape, generator=torch.Generator().manual_seed(0))
    s = torch.tensor([1.0, 0.4, 1.0]).view(-1, 1, 1, 1)
    noisy = (1 - s) * z0 + s * noise
    exact = (noisy - z0) / s
    at_start = torch.tensor([True, False, True])
    with torch.no_grad():
        got = _pixel_loss(den, contextlib.nullcontext, noisy, s, exact, at_start, data.target[idx])
        img = models.vae.decode(z0[[0, 2]] / den.scaling + den.shift).sample
        worse = _pixel_loss(den, contextlib.nullcontext, noisy, s, exact + 0.5 * torch.randn_like(exact), at_start,
                            data.target[idx])
    assert float(got) == pytest.approx(float(image_loss(img, to_pm1(data.target[idx[[0, 2]]]))), rel=1e-4)
    assert float(worse) > float(got)


def test_train_with_pixel_weight_adds_the_image_loss(models, pairs, tmp_path):
    kw = dict(steps=2, batch_size=2, p_one=1.0, fixed_noise=True, seed=3, progress=False)
    plain = train_lllite(models, pairs[0], tmp_path / "a.safetensors", **kw)
    pixel = train_lllite(models, pairs[0], tmp_path / "b.safetensors", pixel_weight=1.0, **kw)
    # same seed, same first batch, zero-initialised adapter: the same latent loss plus a positive image loss
    assert pixel["first_loss"] > plain["first_loss"] and np.isfinite(pixel["final_loss"])
    with pytest.raises(StreameditError, match="pixel-weight"):
        train_lllite(models, pairs[0], tmp_path / "c.safetensors", pixel_weight=-1, **kw)


def test_resume_ends_where_one_unbroken_run_ends(models, pairs, tmp_path):
    """A run stopped after 2 steps and resumed to 4 ends with the same adapter and losses, bit for bit, as one
    4-step run: fresh noise, random sigmas and augmentation all draw from the restored generator, and AdamW
    goes on from its restored moments."""
    kw = dict(batch_size=2, p_one=0.5, seed=5, lr=1e-3, augment=True, progress=False)
    whole = train_lllite(models, pairs[0], tmp_path / "whole.safetensors", steps=4, save_every=2, **kw)
    first = train_lllite(models, pairs[0], tmp_path / "first.safetensors", steps=2, **kw)
    assert first["losses"] == whole["losses"][:2] and (tmp_path / "first.train-state.pt").is_file()
    log = tmp_path / "rest.jsonl"
    rest = train_lllite(models, pairs[0], tmp_path / "rest.safetensors", steps=4, resume=tmp_path / "first.safetensors",
                        log_path=log, **kw)
    assert rest["losses"] == whole["losses"] and [json.loads(x)["step"] for x in log.read_text().splitlines()] == [3, 4]
    a, b = whole["adapter"].state_dict(), rest["adapter"].state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], first["adapter"].state_dict()[k]) for k in a)  # steps 3-4 moved it
    # The --save-every checkpoint resumes as well; a changed option, nothing left to train or no state refuse.
    again = train_lllite(models, pairs[0], tmp_path / "again.safetensors", steps=4,
                         resume=whole["checkpoints"][0], **kw)
    assert again["losses"] == whole["losses"]
    with pytest.raises(StreameditError, match="changed: lr 0.001 -> 0.002"):
        train_lllite(models, pairs[0], tmp_path / "x.safetensors", steps=4, resume=tmp_path / "first.safetensors",
                     **{**kw, "lr": 2e-3})
    with pytest.raises(StreameditError, match="at step 4; --steps 4 leaves nothing"):
        train_lllite(models, pairs[0], tmp_path / "x.safetensors", steps=4, resume=tmp_path / "whole.safetensors", **kw)
    (tmp_path / "first.train-state.pt").unlink()
    with pytest.raises(StreameditError, match="no training state"):
        train_lllite(models, pairs[0], tmp_path / "x.safetensors", steps=4, resume=tmp_path / "first.safetensors", **kw)


def _invoke(*args):
    r = CliRunner().invoke(cli, list(map(str, args)))
    return r.exit_code, r.stdout, r.stderr


def _one_error_line(code, err):
    assert code == 2, err
    lines = [x for x in err.strip().splitlines() if x.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in err, err


def test_cli_end_to_end(clips, tmp_path):
    pairs_dir, out, log = tmp_path / "p", tmp_path / "ad.safetensors", tmp_path / "log.jsonl"
    code, stdout, err = _invoke("train", "pairs", *TINY_CPU, "--clips", clips, "--exclude", "held_out", "-p",
                                "oil painting", "-o", pairs_dir, "--size", SIZE, "--max-frames", 3, "--batch", 2)
    assert code == 0, err
    assert "3 pairs" in stdout and (pairs_dir / MANIFEST).is_file()
    code, stdout, err = _invoke("train", "lllite", *TINY_CPU, "--pairs", pairs_dir, "-o", out, "--steps", 3,
                                "--batch", 2, "--log", log, "--no-bf16")
    assert code == 0, err
    assert "3 steps" in stdout and len(log.read_text().splitlines()) == 3
    assert LLLiteAdapter.load(out, load_models("random:tiny").unet).hooks


def test_cli_bad_inputs(clips, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    bad_manifest = tmp_path / "bad"
    bad_manifest.mkdir()
    (bad_manifest / MANIFEST).write_text("{not json")
    for folder in (tmp_path / "nope", empty, bad_manifest):
        code, _, err = _invoke("train", "lllite", *TINY_CPU, "--pairs", folder, "-o", tmp_path / "x.safetensors")
        _one_error_line(code, err)
    _one_error_line(*_invoke("train", "pairs", *TINY_CPU, "--clips", tmp_path / "nope", "-p", "x", "-o",
                             tmp_path / "p")[::2])
    _one_error_line(*_invoke("train", "pairs", *TINY_CPU, "--clips", clips, "-p", "x", "-o", tmp_path / "p",
                             "--alpha", 0)[::2])


def test_cli_resume_from_a_missing_file(pairs, tmp_path):
    code, _, err = _invoke("train", "lllite", *TINY_CPU, "--pairs", pairs[0], "-o", tmp_path / "x.safetensors",
                           "--steps", 2, "--resume", tmp_path / "nope.safetensors")
    _one_error_line(code, err)
    assert "nope.safetensors" in err and "not found" in err


@pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is not None, reason="bitsandbytes is installed")
def test_cli_adamw8bit_without_bitsandbytes(pairs, tmp_path):
    code, _, err = _invoke("train", "lllite", *TINY_CPU, "--pairs", pairs[0], "-o", tmp_path / "x.safetensors",
                           "--adamw8bit")
    _one_error_line(code, err)
    assert "bitsandbytes" in err
