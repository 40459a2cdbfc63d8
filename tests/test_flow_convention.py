"""The adapter's flow convention (temporal.py): each one against its own definition written directly with
OpenCV / grid_sample, the convention a loaded file selects, and the cond images the adapter receives."""

import cv2
import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from streamedit import EngineConfig, StreamEngine
from streamedit.errors import StreameditError
from streamedit.temporal.adapter import LLLiteAdapter
from streamedit.temporal.conditioner import cond_flow, warp_output

H, W = 72, 120  # non-square on purpose
PAPER = dict(pyr_scale=0.5, levels=3, winsize=15, iterations=3, poly_n=5, poly_sigma=1.2, flags=0)


def _scene(seed=0, h=2 * H, w=2 * W):
    base = np.random.default_rng(seed).integers(0, 255, (h // 8, w // 8, 3), dtype=np.uint8)
    return cv2.resize(base, (w, h), interpolation=cv2.INTER_CUBIC)


def _view(scene, zoom, dx):
    """A W x H window of ``scene`` zoomed about its centre and shifted by ``dx``: non-uniform motion, under
    which the two conventions really differ (for a pure translation they coincide)."""
    m = np.float32([[1 / zoom, 0, W - W / 2 / zoom + dx], [0, 1 / zoom, H - H / 2 / zoom]])
    return cv2.warpAffine(scene, m, (W, H), flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP)  # dst(x) = scene(m x)


def _gray(rgb):
    return cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)


def _definition(convention, prev_in, cur_in, prev_out):
    """The convention as written in its source: Farnebäck on the full-resolution grayscale inputs, then
    cv2.remap (bilinear, replicated border) of the previous output."""
    ys, xs = np.mgrid[:H, :W].astype(np.float32)
    if convention == "forward":  # the paper: previous -> current, sampled at x - F
        f = cv2.calcOpticalFlowFarneback(_gray(prev_in), _gray(cur_in), None, **PAPER)
        mx, my = xs - f[..., 0], ys - f[..., 1]
    else:  # ours: current -> previous, sampled at x + F
        f = cv2.calcOpticalFlowFarneback(_gray(cur_in), _gray(prev_in), None, **PAPER)
        mx, my = xs + f[..., 0], ys + f[..., 1]
    remapped = cv2.remap(prev_out, mx, my, cv2.INTER_LINEAR, borderMode=cv2.BORDER_REPLICATE)
    grid = torch.from_numpy(np.stack([mx / (W - 1) * 2 - 1, my / (H - 1) * 2 - 1], -1))[None]
    sampled = torch.nn.functional.grid_sample(torch.from_numpy(prev_out).permute(2, 0, 1)[None].float(), grid,
                                              mode="bilinear", padding_mode="border", align_corners=True)
    return remapped, sampled[0].permute(1, 2, 0).round().numpy()


def _ours(convention, prev_in, cur_in, prev_out):
    flow = torch.from_numpy(cond_flow(cur_in, prev_in, convention=convention))[None]
    return warp_output(torch.from_numpy(prev_out).permute(2, 0, 1), flow)[0].permute(1, 2, 0).numpy()


def test_each_convention_reproduces_its_definition():
    scene = _scene()
    prev_in, cur_in = _view(scene, 1.0, 0), _view(scene, 1.08, 2)
    prev_out = cv2.GaussianBlur(np.ascontiguousarray(prev_in[..., ::-1]), (0, 0), 1)  # a "stylized" previous output
    ours = {c: _ours(c, prev_in, cur_in, prev_out) for c in ("forward", "backward")}
    for c in ours:
        remapped, sampled = _definition(c, prev_in, cur_in, prev_out)
        diff = np.abs(ours[c] - remapped)  # cv2.remap interpolates in 1/32-pixel fixed point: one level at most
        assert diff.max() <= 1 and diff.mean() < 0.01
        assert np.abs(ours[c] - sampled).max() <= 1
    # the check can fail: the other convention's definition is far off on this motion
    other = _definition("backward", prev_in, cur_in, prev_out)[0]
    assert np.abs(ours["forward"] - other).mean() > 0.3


def test_reduced_flow_size_keeps_the_aspect_and_the_convention():
    scene = _scene(1)
    prev_in, cur_in = _view(scene, 1.0, 0), _view(scene, 1.0, 3)  # 3 px to the left
    for convention in ("forward", "backward"):
        d = cond_flow(cur_in, prev_in, size=60, convention=convention)
        assert d.shape == (H, W, 2)
        assert abs(float(np.median(d[..., 0])) - 3) < 1.0 and abs(float(np.median(d[..., 1]))) < 1.0
    with pytest.raises(ValueError, match="convention"):
        cond_flow(cur_in, prev_in, convention="sideways")


def _adapter_file(unet, tmp_path, layout):
    source = LLLiteAdapter.for_unet(unet, hooks="down", cond_size=64)
    if layout == "paper":  # otanl/dreamlite-lllite LLLiteController.state_dict(), the released file's metadata
        sd = {f"modules_dict.{h.replace('.', '__')}.{k}": t
              for h, m in source.items() for k, t in m.state_dict().items()}
        path = tmp_path / "temporal_lllite_step001440.safetensors"
        save_file(sd, str(path), {"kind": "temporal_lllite", "cond_emb_dim": "32", "mlp_dim": "64", "step": "1440"})
        return path
    path = tmp_path / f"{layout}.safetensors"
    LLLiteAdapter.for_unet(unet, hooks="down", cond_size=64, flow=layout).save(path)
    return path


@pytest.mark.parametrize("layout,expected", [("paper", "forward"), ("forward", "forward"), ("backward", "backward")])
def test_loading_picks_the_files_convention(tiny_models, tmp_path, layout, expected):
    path = _adapter_file(tiny_models.unet, tmp_path, layout)
    assert LLLiteAdapter.load(path, tiny_models.unet).config.flow == expected
    engine = StreamEngine(tiny_models, EngineConfig(prompt="oil painting", batch_size=1, size=64, lllite=str(path)))
    try:
        assert engine.temporal.convention == expected
    finally:
        engine.close()


def test_files_without_the_key_keep_the_backward_convention(tiny_models, tmp_path):
    from safetensors import safe_open

    path = _adapter_file(tiny_models.unet, tmp_path, "forward")
    with safe_open(str(path), framework="pt") as f:
        meta, tensors = dict(f.metadata()), {k: f.get_tensor(k) for k in f.keys()}
    del meta["flow"]  # a file written before the convention was recorded
    save_file(tensors, str(path), meta)
    assert LLLiteAdapter.load(path, tiny_models.unet).config.flow == "backward"
    meta["flow"] = "sideways"
    save_file(tensors, str(path), meta)
    with pytest.raises(StreameditError, match="flow convention"):
        LLLiteAdapter.load(path, tiny_models.unet)


def _moving(n=6):
    scene = _scene(2)
    return [np.ascontiguousarray(_view(scene, 1.0 + 0.03 * i, 2 * i)[4:68, 12:108]) for i in range(n)]  # 64 x 96


@pytest.mark.parametrize("convention", ["forward", "backward"])
def test_engine_cond_images_follow_the_convention(tiny_models, convention):
    """What the adapter's conditioning CNNs receive: RGB in [-1, 1] at the (non-square) working size; the
    inputs themselves on the first batch, then the previous output warped by the adapter's convention."""
    adapter = LLLiteAdapter.for_unet(tiny_models.unet, hooks="down", cond_size=64, flow=convention)
    engine = StreamEngine(tiny_models, EngineConfig(prompt="oil painting", batch_size=2, size=96, seed=0,
                                                    fixed_noise=True, lllite=adapter, cond_refresh_every=1))
    seen, embed, remember = [], adapter.embed, engine.temporal.remember
    adapter.embed = lambda images: (seen.append((images.clone(), engine.temporal._prev_output)), embed(images))[1]
    frames = _moving()

    def textured_previous_output(outputs, count):  # the random tiny model's output is nearly flat: stylize
        remember(outputs, count)                    # the previous input by inverting it instead
        assert engine.temporal._prev_output.shape == (3, 64, 96)
        engine.temporal._prev_output = torch.from_numpy(255 - frames[2 * len(outs_seen) + count - 1]).permute(2, 0, 1)
        outs_seen.append(count)

    outs_seen = []
    engine.temporal.remember = textured_previous_output
    try:
        list(engine.run(frames))
    finally:
        engine.close()
    assert engine.shape == (64, 96) and len(seen) == 3
    first = seen[0][0]
    assert first.shape == (2, 3, 64, 96) and first.min() >= -1 and first.max() <= 1
    want = torch.from_numpy(np.stack(frames[:2])).permute(0, 3, 1, 2).float() / 127.5 - 1  # RGB order kept
    assert torch.allclose(first, want, atol=1e-6)
    images, prev_out = seen[1]
    prev_out = prev_out.permute(1, 2, 0).numpy()
    assert np.array_equal(prev_out, 255 - frames[1])  # the previous batch's last "output"
    for i, frame in enumerate(frames[2:4]):
        got = (images[i].permute(1, 2, 0) + 1) * 127.5
        ref = _definition_at(convention, frames[1], frame, prev_out)
        assert np.abs(got.numpy() - ref).max() <= 1 + 1e-3
        other = _definition_at("backward" if convention == "forward" else "forward", frames[1], frame, prev_out)
        assert np.abs(got.numpy() - other).mean() > 0.1  # the conventions are told apart here


def _definition_at(convention, prev_in, cur_in, prev_out):
    global H, W
    saved, (H, W) = (H, W), prev_in.shape[:2]
    try:
        return _definition(convention, prev_in, cur_in, prev_out)[0].astype(np.float32)
    finally:
        H, W = saved
