"""Generated test and training clips with natural-looking texture, camera motion, occlusion and cuts.

No downloads: every clip is a pure function of its seed (numpy's ``default_rng`` and OpenCV's drawing and
resampling, all deterministic), so the protocol's test set (:mod:`streamedit.eval.protocol`) is the same
on every machine and never touched by training.

How a clip is made (:func:`synthetic_clip`):

* **a still** (:func:`natural_still`), larger than the frame: fractal noise with a 1/f^beta amplitude
  spectrum (the power law natural images follow; beta ~ 1-1.6 per layer) mapped through a random
  3-colour palette, a second, finer noise layer for grain, and 6-14 OpenCV-drawn objects (ellipses,
  polygons, branching strokes) filled with their own fractal texture and shaded by it, so edges exist at
  every scale;
* **a camera** that moves over the still: a smooth pan (random direction, 0.5-3 px/frame at the output
  size, with a slow sinusoidal wobble), a zoom (scale drifting by up to +-1 %/frame) and a rotation (up to
  +-0.6 deg/frame); each frame is the still resampled through that similarity transform (``warpAffine``,
  bilinear, reflected border);
* **occluders**: 1-3 textured blobs that move across the frame in screen space, independently of the
  camera (their own velocity and spin), drawn with anti-aliased masks;
* **a hard cut** (``cut_at``): from that frame on, a different still, camera and occluders (seeded from
  ``seed`` as well), drawn until the luma histogram jumps by 1.5x the engine's scene-cut threshold, as it
  does between different scenes;
* mild sensor noise (sigma 1.5 of 255), seeded per frame.

``write_synthetic_clips`` writes clips as ``synth-<seed>.mp4`` for ``train pairs`` (H.264, crf 18).
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

MOTIONS = ("pan", "zoom", "rotate", "mixed")


def fractal_noise(rng: np.random.Generator, h: int, w: int, beta: float) -> np.ndarray:
    """(h, w) float32 noise in [0, 1] with a 1/f^beta amplitude spectrum (random phase)."""
    fy = np.fft.fftfreq(h)[:, None]
    fx = np.fft.rfftfreq(w)[None, :]
    f = np.sqrt(fx * fx + fy * fy)
    f[0, 0] = 1.0
    spec = (rng.standard_normal(f.shape) + 1j * rng.standard_normal(f.shape)) / f ** beta
    spec[0, 0] = 0
    img = np.fft.irfft2(spec, s=(h, w)).astype(np.float32)
    lo, hi = np.percentile(img, (1, 99))
    return np.clip((img - lo) / max(hi - lo, 1e-6), 0, 1)


def _palette(rng: np.random.Generator, v: np.ndarray) -> np.ndarray:
    """Map (h, w) values in [0, 1] through a random 3-stop colour ramp -> (h, w, 3) float32 in [0, 255]."""
    stops = rng.uniform(0, 255, (3, 3)).astype(np.float32)
    stops[1] = stops[1] * 0.5 + rng.uniform(60, 200) * 0.5  # a mid tone, not only extremes
    a = np.clip(v * 2, 0, 1)[..., None]
    b = np.clip(v * 2 - 1, 0, 1)[..., None]
    return (1 - a) * stops[0] + a * ((1 - b) * stops[1] + b * stops[2])


def natural_still(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """An (h, w, 3) uint8 image with 1/f texture at every scale and drawn, textured objects."""
    img = _palette(rng, fractal_noise(rng, h, w, rng.uniform(1.2, 1.7)))
    grain = fractal_noise(rng, h, w, rng.uniform(0.8, 1.1)) - 0.5
    img += grain[..., None] * rng.uniform(30, 70)
    for _ in range(int(rng.integers(6, 15))):
        tex = _palette(rng, fractal_noise(rng, h, w, rng.uniform(1.0, 1.6)))
        mask = np.zeros((h, w), np.uint8)
        kind = rng.integers(3)
        cx, cy = int(rng.integers(0, w)), int(rng.integers(0, h))
        r = int(rng.uniform(0.04, 0.2) * min(h, w))
        if kind == 0:
            cv2.ellipse(mask, (cx, cy), (r, int(r * rng.uniform(0.3, 1.0))), float(rng.uniform(0, 180)), 0, 360, 255,
                        -1, cv2.LINE_AA)
        elif kind == 1:
            ang = np.sort(rng.uniform(0, 2 * np.pi, int(rng.integers(3, 8))))
            rad = r * rng.uniform(0.5, 1.2, len(ang))
            pts = np.stack([cx + rad * np.cos(ang), cy + rad * np.sin(ang)], 1).astype(np.int32)
            cv2.fillPoly(mask, [pts], 255, cv2.LINE_AA)
        else:  # a branching stroke (twigs, cables, grass)
            for _ in range(int(rng.integers(2, 6))):
                a = rng.uniform(0, 2 * np.pi)
                end = (int(cx + r * 2 * np.cos(a)), int(cy + r * 2 * np.sin(a)))
                cv2.line(mask, (cx, cy), end, 255, int(rng.integers(1, 5)), cv2.LINE_AA)
        m = (mask.astype(np.float32) / 255)[..., None]
        shade = 0.6 + 0.8 * fractal_noise(rng, h, w, 2.0)[..., None]  # soft lighting over the object
        img = img * (1 - m) + np.clip(tex * shade, 0, 255) * m
    return np.clip(img, 0, 255).astype(np.uint8)


def _camera(rng: np.random.Generator, motion: str, size: int) -> dict:
    """Per-shot camera parameters (velocities in output pixels, %/frame and degrees/frame)."""
    a = rng.uniform(0, 2 * np.pi)
    speed = rng.uniform(0.5, 3.0) * size / 256
    cam = {"vx": speed * np.cos(a), "vy": speed * np.sin(a), "zoom": 0.0, "spin": 0.0,
           "wobble": rng.uniform(0, 0.6) * size / 256, "phase": rng.uniform(0, 2 * np.pi),
           "scale0": rng.uniform(0.55, 0.8)}
    if motion in ("zoom", "mixed"):
        cam["zoom"] = rng.choice([-1, 1]) * rng.uniform(0.003, 0.01)
    if motion in ("rotate", "mixed"):
        cam["spin"] = rng.choice([-1, 1]) * rng.uniform(0.15, 0.6)
    if motion in ("zoom", "rotate"):
        cam["vx"] *= 0.3
        cam["vy"] *= 0.3
    return cam


def _occluders(rng: np.random.Generator, n: int, w: int, h: int) -> list[dict]:
    occ = []
    for _ in range(n):
        size = int(rng.uniform(0.12, 0.3) * min(w, h))
        tex = natural_still(rng, size * 2, size * 2)
        mask = np.zeros((size * 2, size * 2), np.uint8)
        ang = np.sort(rng.uniform(0, 2 * np.pi, int(rng.integers(5, 9))))
        rad = size * rng.uniform(0.55, 0.95, len(ang))
        pts = np.stack([size + rad * np.cos(ang), size + rad * np.sin(ang)], 1).astype(np.int32)
        cv2.fillPoly(mask, [pts], 255, cv2.LINE_AA)
        a = rng.uniform(0, 2 * np.pi)
        speed = rng.uniform(1.0, 4.0) * min(w, h) / 256
        occ.append({"tex": tex, "mask": mask, "x": rng.uniform(0.1, 0.9) * w, "y": rng.uniform(0.1, 0.9) * h,
                    "vx": speed * np.cos(a), "vy": speed * np.sin(a), "spin": rng.uniform(-3, 3)})
    return occ


class _Shot:
    """One shot: a still, its camera path and its occluders; ``frame(i)`` renders frame i of the shot."""

    def __init__(self, rng: np.random.Generator, w: int, h: int, motion: str, occluders: int):
        self.w, self.h = w, h
        self.side = int(2 * max(w, h))
        self.still = natural_still(rng, self.side, self.side)
        self.cam = _camera(rng, motion, max(w, h))
        self.occ = _occluders(rng, occluders, w, h)

    def frame(self, i: int) -> np.ndarray:
        c = self.cam
        # output pixel p maps to still pixel centre + R(-angle) (p - frame centre) / scale
        scale = self.cam["scale0"] * self.side / (1.5 * max(self.w, self.h)) * (1 + c["zoom"]) ** i
        angle = c["spin"] * i
        wob = c["wobble"] * np.sin(0.15 * i + c["phase"])
        cx = self.side / 2 + (c["vx"] * i + wob) / scale
        cy = self.side / 2 + (c["vy"] * i + wob * 0.6) / scale
        m = cv2.getRotationMatrix2D((cx, cy), angle, scale)
        m[:, 2] += np.array([self.w / 2 - cx, self.h / 2 - cy])
        img = cv2.warpAffine(self.still, m, (self.w, self.h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)
        for o in self.occ:  # screen-space movers, wrapping around the frame
            s = o["tex"].shape[0]
            x = (o["x"] + o["vx"] * i) % (self.w + s) - s / 2
            y = (o["y"] + o["vy"] * i) % (self.h + s) - s / 2
            r = cv2.getRotationMatrix2D((s / 2, s / 2), o["spin"] * i, 1.0)
            r[:, 2] += (x - s / 2, y - s / 2)
            tex = cv2.warpAffine(o["tex"], r, (self.w, self.h), flags=cv2.INTER_LINEAR)
            mask = cv2.warpAffine(o["mask"], r, (self.w, self.h), flags=cv2.INTER_LINEAR)
            a = (mask.astype(np.float32) / 255)[..., None]
            img = (img * (1 - a) + tex * a).astype(np.uint8)
        return img


def _cut_to(rng: np.random.Generator, before: _Shot, cut_at: int, w: int, h: int, n_occ: int) -> _Shot:
    """The shot after a hard cut: redrawn (up to 8 times, deterministically) until the runtime's scene-cut
    detector would see the cut with a margin, as it sees a cut between different scenes."""
    from ..temporal.conditioner import SceneCutDetector

    det = SceneCutDetector()
    last = det.histogram(before.frame(cut_at - 1))
    for _ in range(8):
        shot = _Shot(rng, w, h, MOTIONS[int(rng.integers(len(MOTIONS)))], n_occ)
        if float(np.abs(det.histogram(shot.frame(0)) - last).sum()) > 1.5 * det.threshold:
            break
        shot.still = 255 - shot.still  # a darker/lighter scene: still textured, histogram moved
        if float(np.abs(det.histogram(shot.frame(0)) - last).sum()) > 1.5 * det.threshold:
            break
    return shot


def synthetic_clip(seed: int, frames: int = 48, width: int = 256, height: int = 256, cut_at: int | None = None,
                   motion: str | None = None, occluders: int | None = None, noise: float = 1.5) -> np.ndarray:
    """(frames, height, width, 3) uint8: a deterministic clip for ``seed`` (module docstring).
    ``motion``: pan | zoom | rotate | mixed (default: chosen by the seed); ``occluders``: default 1-3;
    ``cut_at``: frame index of a hard cut to a new shot (None: one shot)."""
    if motion is not None and motion not in MOTIONS:
        raise ValueError(f"motion must be one of {MOTIONS}, got {motion!r}")
    if frames < 1 or width < 16 or height < 16:
        raise ValueError("a synthetic clip needs >= 1 frame of at least 16x16")
    rng = np.random.default_rng([seed, 0x5E])
    motion = motion or MOTIONS[int(rng.integers(len(MOTIONS)))]
    n_occ = int(rng.integers(1, 4)) if occluders is None else occluders
    shots = [_Shot(rng, width, height, motion, n_occ)]
    if cut_at is not None and 0 < cut_at < frames:
        shots.append(_cut_to(rng, shots[0], cut_at, width, height, n_occ))
    out = np.empty((frames, height, width, 3), np.uint8)
    for i in range(frames):
        second = len(shots) > 1 and i >= cut_at
        img = shots[1].frame(i - cut_at) if second else shots[0].frame(i)
        if noise:
            grain = np.random.default_rng([seed, 0xA0, i]).normal(0, noise, img.shape)
            img = np.clip(img + grain, 0, 255).astype(np.uint8)
        out[i] = img
    return out


def write_synthetic_clips(folder, seeds, frames: int = 48, size: int = 256, cut_at: int | None = None,
                          fps: int = 24) -> list[Path]:
    """Write ``synth-<seed>.mp4`` for each seed into ``folder`` (for ``train pairs --clips``)."""
    from .clips import write_clip

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    return [write_clip(folder / f"synth-{s:05d}.mp4", list(synthetic_clip(s, frames, size, size, cut_at)), fps)
            for s in seeds]
