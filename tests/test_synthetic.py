"""The generated clips (streamedit.video.synthetic): deterministic, moving, occluded, cut where asked."""

import numpy as np
import pytest

from streamedit.temporal.conditioner import SceneCutDetector, farneback, warp
from streamedit.video.clips import read_frames
from streamedit.video.synthetic import (
    MOTIONS,
    fractal_noise,
    synthetic_clip,
    write_synthetic_clips,
)


def test_deterministic_from_the_seed():
    a = synthetic_clip(7, frames=6, width=96, height=64)
    assert a.shape == (6, 64, 96, 3) and a.dtype == np.uint8
    assert np.array_equal(a, synthetic_clip(7, frames=6, width=96, height=64))
    assert not np.array_equal(a, synthetic_clip(8, frames=6, width=96, height=64))


def test_fractal_noise_follows_its_power_law():
    """A steeper spectrum puts less of the energy at high frequencies."""
    rng = np.random.default_rng(0)

    def hf(img):
        f = np.abs(np.fft.fft2(img - img.mean())) ** 2
        fy, fx = np.meshgrid(np.fft.fftfreq(img.shape[0]), np.fft.fftfreq(img.shape[1]), indexing="ij")
        return f[np.hypot(fx, fy) > 0.25].sum() / f.sum()

    assert hf(fractal_noise(rng, 128, 128, 0.6)) > 3 * hf(fractal_noise(rng, 128, 128, 1.6))


@pytest.mark.parametrize("motion", MOTIONS)
def test_camera_motion_is_real_and_flow_explains_it(motion):
    """Consecutive frames differ, and warping by the measured flow explains most of the difference
    (a camera move, not noise or flicker)."""
    clip = synthetic_clip(3, frames=4, width=128, height=128, motion=motion, occluders=0, noise=0)
    a, b = clip[1], clip[2]
    flow = farneback(a, b)
    assert np.linalg.norm(flow, axis=-1).mean() > 0.3
    import torch

    moved = warp(torch.from_numpy(b).permute(2, 0, 1)[None].float(), torch.from_numpy(flow)[None])[0]
    err_warp = np.abs(moved.permute(1, 2, 0).numpy() - a)[8:-8, 8:-8].mean()
    err_raw = np.abs(b.astype(np.float32) - a)[8:-8, 8:-8].mean()
    assert err_warp < 0.6 * err_raw


def test_occluders_move_against_the_background():
    """With occluders the clip differs from the same camera without them, in a region that moves."""
    with_occ = synthetic_clip(5, frames=8, width=96, height=96, motion="pan", occluders=2, noise=0)
    without = synthetic_clip(5, frames=8, width=96, height=96, motion="pan", occluders=0, noise=0)
    # occluders are drawn after the camera's rng draws, so the background is the same: masks are the difference
    masks = [np.abs(w.astype(int) - o).sum(-1) > 0 for w, o in zip(with_occ, without)]
    assert all(m.any() for m in masks)
    assert not np.array_equal(masks[0], masks[-1])


def test_hard_cut_only_where_asked():
    clip = synthetic_clip(11, frames=24, width=96, height=96, cut_at=13)
    det = SceneCutDetector()
    assert [i for i, f in enumerate(clip) if det.update(f)] == [13]
    det = SceneCutDetector()
    assert not any(det.update(f) for f in synthetic_clip(11, frames=24, width=96, height=96))


def test_written_clips_decode(tmp_path):
    paths = write_synthetic_clips(tmp_path, [1, 2], frames=5, size=64)
    assert [p.name for p in paths] == ["synth-00001.mp4", "synth-00002.mp4"]
    frames = read_frames(paths[0])
    assert len(frames) == 5 and frames[0].shape == (64, 64, 3)
    ref = synthetic_clip(1, 5, 64, 64)
    err = [np.abs(frames[2].astype(int) - r).mean() for r in ref]
    assert int(np.argmin(err)) == 2 and err[2] < 10  # the same frame, through H.264 (crf 18, 4:2:0 chroma)


def test_bad_arguments():
    with pytest.raises(ValueError, match="motion"):
        synthetic_clip(0, motion="dolly")
    with pytest.raises(ValueError):
        synthetic_clip(0, frames=0)
