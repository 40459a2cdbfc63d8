"""Metrics on clips built in numpy: static, translated, noisy and blurred; tiny random CLIP; skips."""

import importlib.util
import json

import cv2
import numpy as np
import pytest
import torch

from streamedit.eval import (Flows, as_frames, available_metrics, compute_all, compute_flows, hf_fft_energy,
                             sobel_sharpness, valid_mask, warp_error, windowed)

H = W = 64
T = 6
STEP = 2  # pixels per frame of the translated clip
HAS_TV = importlib.util.find_spec("torchvision") is not None


@pytest.fixture(scope="module")
def texture():
    """Smooth random colour texture (blurred noise, stretched to 0..255), twice the frame size."""
    rng = np.random.default_rng(0)
    base = cv2.GaussianBlur(rng.random((2 * H, 2 * W, 3)).astype(np.float32), (0, 0), 2.0)
    return ((base - base.min()) / (base.max() - base.min()) * 255).astype(np.uint8)


@pytest.fixture(scope="module")
def translated(texture):
    # a window sliding right over the texture: content moves left STEP px per frame
    return np.stack([texture[8:8 + H, 8 + STEP * t:8 + STEP * t + W] for t in range(T)])


@pytest.fixture(scope="module")
def flows(translated):
    return compute_flows(translated)


def noise_clip(seed=1):
    return (np.random.default_rng(seed).random((T, H, W, 3)) * 255).astype(np.uint8)


def blur(clip, sigma):
    return np.stack([cv2.GaussianBlur(f, (0, 0), sigma) for f in clip]) if sigma else clip


# ------------------------------------------------------------------------------------------ frame input
def test_frame_layouts_agree(translated):
    ref = sobel_sharpness(translated)
    f = torch.from_numpy(translated).float() / 255
    for clip in (list(translated), torch.from_numpy(translated), f, f.permute(0, 3, 1, 2)):
        assert sobel_sharpness(clip) == pytest.approx(ref, rel=1e-5)
    assert as_frames(list(translated)).shape == (T, 3, H, W)


# ------------------------------------------------------------------------------------------- warp error
def test_static_clip_has_zero_warp_error(texture):
    static = np.stack([texture[:H, :W]] * T)
    assert warp_error(static, static) < 1e-6


def test_translation_small_noise_large(translated, flows):
    e_trans = warp_error(None, translated, flows)
    e_noise = warp_error(None, noise_clip(), flows)
    assert e_trans < 1e-4
    assert e_noise == pytest.approx(1 / 6, rel=0.1)  # E[(U-U')^2] for independent U ~ U[0,1]
    assert e_noise > 1e3 * e_trans
    # flow given as a method name computes the same flows
    assert warp_error(translated, translated) == pytest.approx(e_trans, rel=1e-6)


def test_flow_direction_and_mask(flows):
    # frame t at x shows frame t+1 at x - STEP: forward flow is (-STEP, 0)
    assert flows.fw[:, 0].mean() == pytest.approx(-STEP, abs=0.05)
    assert flows.fw[:, 1].abs().mean() < 0.05
    assert flows.valid_fraction > 0.9
    assert not flows.valid[:, :, :STEP].any()  # x + fw(x) < 0: left the frame
    assert flows.valid[:, 4:-4, STEP + 4:-4].float().mean() > 0.97


def test_valid_mask_synthetic():
    fw = torch.zeros(1, 2, 16, 16)
    fw[:, 0] = 3
    m = valid_mask(fw, -fw)  # consistent pair: valid except where x + 3 leaves the frame
    assert m[0, :, :13].all() and not m[0, :, 13:].any()
    assert not valid_mask(fw, fw)[0].any()  # backward flow points the same way: all occluded
    step = torch.zeros(1, 2, 16, 16)
    step[:, 0, :, 8:] = 0.3  # a small, forward-backward consistent jump between columns 7 and 8
    assert not valid_mask(step, -step)[0, :, 7].any()  # |grad fw|^2 = 0.09 > 0.002: motion boundary
    assert valid_mask(step, -step, motion_boundaries=False)[0, :, 7].all()
    assert valid_mask(step, -step)[0, :, :7].all()


def test_outputs_at_another_resolution(translated, flows):
    up = np.stack([cv2.resize(f, (2 * W, 2 * H), interpolation=cv2.INTER_CUBIC) for f in translated])
    assert warp_error(None, up, flows) < 1e-3
    assert warp_error(None, noise_clip()[:, :, :, :], flows) > 0.1


def test_per_pair_and_windowed(translated, flows):
    per = warp_error(None, translated, flows, return_per_pair=True)
    assert per.shape == (T - 1,) and np.isfinite(per).all()
    w = windowed(warp_error, None, translated, window=3, flow=flows)
    assert w["starts"] == [0, 3]
    assert w["values"][0] == pytest.approx(per[:2].mean(), rel=1e-6)  # pairs (0,1),(1,2)
    assert w["values"][1] == pytest.approx(per[3:5].mean(), rel=1e-6)  # pair (2,3) straddles: dropped
    assert w["std"] == pytest.approx(np.std(w["values"]))
    s = windowed(sobel_sharpness, translated, window=4)
    assert len(s["values"]) == 2 and s["std"] >= 0


def test_flows_slice(flows):
    sub = flows[1:3]
    assert isinstance(sub, Flows) and len(sub) == 2 and sub.method == "farneback"


# ------------------------------------------------------------------------------------------- sharpness
def test_blur_lowers_sobel_and_hf_monotonically(translated):
    sigmas = [0, 0.5, 1, 2, 4]
    sob = [sobel_sharpness(blur(translated, s)) for s in sigmas]
    hf = [hf_fft_energy(blur(translated, s)) for s in sigmas]
    assert all(a > b for a, b in zip(sob, sob[1:])), sob
    assert all(a > b for a, b in zip(hf, hf[1:])), hf


def test_smoothing_trap(translated, flows):
    # a flickering stylization: blurring it lowers the warp error *and* the sharpness
    rng = np.random.default_rng(3)
    flicker = np.clip(translated + rng.normal(0, 12, translated.shape), 0, 255).astype(np.uint8)
    smooth = blur(flicker, 2)
    assert warp_error(None, smooth, flows) < 0.5 * warp_error(None, flicker, flows)
    assert sobel_sharpness(smooth) < 0.5 * sobel_sharpness(flicker)


def test_hf_fft_reference_images():
    yy, xx = np.mgrid[:H, :W]
    flat = np.full((1, H, W, 3), 128, np.uint8)
    checker = np.repeat((((xx + yy) % 2) * 255).astype(np.uint8)[None, :, :, None], 3, -1)
    slow = np.repeat((127 + 100 * np.sin(2 * np.pi * xx / W)).astype(np.uint8)[None, :, :, None], 3, -1)
    assert hf_fft_energy(flat) == 0.0
    assert hf_fft_energy(checker) > 0.99  # all power at Nyquist
    assert hf_fft_energy(slow) < 0.01  # one cycle per frame
    assert sobel_sharpness(flat) < 1e-6
    assert hf_fft_energy(checker, radius=1.5) == 0.0  # a disc past the corner keeps everything


# ---------------------------------------------------------------------------------------- compute_all
def test_compute_all_base(translated):
    res = compute_all(translated, blur(translated, 1), prompt="make it a watercolor")
    for k in ("warp_error", "warp_error_input", "warp_valid_fraction", "sobel", "sobel_input", "hf_fft",
              "hf_fft_input"):
        assert np.isfinite(res[k]), k
    assert res["sobel"] < res["sobel_input"]
    assert set(res["skipped"]) == {"lpips", "clip", "raft"}
    assert all("\n" not in r and r for r in res["skipped"].values())


def test_lpips_raft_skip_without_torchvision(tmp_path, translated):
    if HAS_TV:
        pytest.skip("torchvision is installed: the skip path does not apply")
    fake = tmp_path / "w.pth"
    torch.save({}, fake)
    avail = available_metrics(lpips_weights=fake, raft_weights=fake)
    for name in ("lpips", "raft"):
        ok, reason = avail[name]
        assert not ok and "torchvision" in reason and "\n" not in reason
    res = compute_all(translated, translated, lpips_weights=fake, raft_weights=fake)
    assert "torchvision" in res["skipped"]["lpips"] and "torchvision" in res["skipped"]["raft"]
    assert available_metrics(lpips_weights=tmp_path / "nope.pth")["lpips"] == (
        False, f"--lpips-weights file not found: {tmp_path / 'nope.pth'}")


# ------------------------------------------------------------------------------------------------ CLIP
def build_tiny_clip(path):
    """A random CLIP with a character-level BPE tokenizer and the PIL image processor, saved offline."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import CLIPConfig, CLIPModel, PreTrainedTokenizerFast
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    specials = ["<unk>", "<s>", "</s>", "<pad>"]
    vocab = {t: i for i, t in enumerate(specials + list("abcdefghijklmnopqrstuvwxyz"))}
    bpe = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    bpe.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=bpe, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                            pad_token="<pad>").save_pretrained(path)
    cfg = CLIPConfig(
        text_config=dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=16, bos_token_id=1, eos_token_id=2,
                         pad_token_id=3),
        vision_config=dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=37,
                           num_hidden_layers=2, num_attention_heads=2),
        projection_dim=16)
    torch.manual_seed(0)
    CLIPModel(cfg).save_pretrained(path)
    CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(path)
    # published CLIP folders name the generic class: make sure that loads without torchvision too
    pp = path / "preprocessor_config.json"
    pp.write_text(json.dumps({**json.loads(pp.read_text()), "image_processor_type": "CLIPImageProcessor"}))
    return path


def test_tiny_clip_runs(tmp_path, translated):
    clip_dir = build_tiny_clip(tmp_path / "clip")
    assert available_metrics(clip_model=clip_dir)["clip"] == (True, "")
    long_prompt = "make it look like a watercolor painting with soft pastel colours and paper grain"
    res = compute_all(translated, noise_clip(), prompt=long_prompt, clip_model=clip_dir)
    assert "clip" not in res["skipped"]
    for k in ("clip_text", "clip_text_input", "clip_io", "clip_temporal"):
        assert np.isfinite(res[k]) and -1.0001 <= res[k] <= 1.0001, k
    same = compute_all(translated, translated, clip_model=clip_dir)
    assert same["clip_io"] == pytest.approx(1.0, abs=1e-5)
    assert same["skipped"]["clip_text"] == "no prompt given"


def test_clip_bad_folder(tmp_path):
    ok, reason = available_metrics(clip_model=tmp_path)["clip"]
    assert not ok and "config.json" in reason
    (tmp_path / "config.json").write_text("{}")  # passes the cheap check, fails to load: a skip, not a crash
    res = compute_all(noise_clip()[:2], noise_clip()[:2], clip_model=tmp_path)
    assert "clip" in res["skipped"] and "\n" not in res["skipped"]["clip"]


# ------------------------------------------------------------------ LPIPS / RAFT (only with torchvision)
@pytest.mark.skipif(not HAS_TV, reason="torchvision not installed")
@pytest.mark.filterwarnings("ignore:.*(pretrained|weight enum).*:UserWarning")  # lpips' torchvision calls
def test_lpips_random_weights(tmp_path, translated):
    lpips = pytest.importorskip("lpips")
    import torchvision

    full = tmp_path / "lpips_full.pth"
    torch.save(lpips.LPIPS(net="alex", pnet_rand=True, verbose=False).state_dict(), full)
    backbone = tmp_path / "alexnet.pth"
    torch.save(torchvision.models.alexnet(weights=None).state_dict(), backbone)
    for path in (full, backbone):
        res = compute_all(translated, noise_clip(), lpips_weights=path)
        assert "lpips" not in res["skipped"], res["skipped"]
        assert all(np.isfinite(res[k]) for k in ("lpips_temporal", "lpips_temporal_input", "lpips_io"))
        assert res["lpips_temporal"] > res["lpips_temporal_input"]


@pytest.mark.skipif(not HAS_TV, reason="torchvision not installed")
def test_raft_random_weights(tmp_path, translated):
    from torchvision.models.optical_flow import raft_large

    path = tmp_path / "raft.pth"
    torch.save(raft_large(weights=None).state_dict(), path)
    res = compute_all(translated[:3], translated[:3], raft_weights=path)
    assert "raft" not in res["skipped"], res["skipped"]
    assert np.isfinite(res["warp_valid_fraction_raft"])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_matches_cpu(translated, flows):
    noisy = noise_clip()
    cpu = [warp_error(None, noisy, flows), sobel_sharpness(noisy), hf_fft_energy(noisy)]
    gpu_clip = torch.from_numpy(noisy).cuda()
    gpu = [warp_error(None, gpu_clip, flows), sobel_sharpness(gpu_clip), hf_fft_energy(gpu_clip)]
    assert gpu == pytest.approx(cpu, rel=1e-4)
