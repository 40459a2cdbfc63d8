#!/usr/bin/env python
"""Generate src/streamedit/assets/example.mp4, the clip `make demo` stylizes.

Procedural and deterministic (fixed seed, no inputs): 256x256, 24 fps, 60 frames (2.5 s) of a
small landscape under a slow camera pan -- sky gradient, sun, hills, a textured meadow, a house,
a bouncing ball, a sliding car and a spinning pinwheel -- with a soft A-major chord as audio.
H.264 (libx264 CRF 20) + AAC in MP4, about 90 KB.

    python scripts/make_example_clip.py [OUTPUT]
"""

import sys
from pathlib import Path

import cv2
import numpy as np

from streamedit.video.clips import write_clip

W = H = 256
FPS, FRAMES = 24, 60
WORLD_W = 384  # the world is wider than the view: the camera pans across it
PAN = 1.6      # pixels per frame
SR = 48000


def world_background(rng: np.random.Generator) -> np.ndarray:
    """Static part of the world (RGB uint8, H x WORLD_W): sky, hills, meadow texture, house."""
    y, x = np.mgrid[0:H, 0:WORLD_W].astype(np.float32)
    sky = np.stack([90 + 100 * y / H, 150 + 70 * y / H, np.full_like(y, 235)], -1)
    img = sky
    hills = 150 + 18 * np.sin(x / 37.0) + 10 * np.sin(x / 13.0 + 1.0)
    img = np.where((y > hills)[..., None], np.stack([70 + 0 * x, 120 + 0.2 * (y - 150), 60 + 0 * x], -1), img)
    # Meadow: low-frequency noise, upsampled, so the texture compresses well but has structure.
    noise = cv2.resize(rng.random((H // 8, WORLD_W // 8)).astype(np.float32), (WORLD_W, H),
                       interpolation=cv2.INTER_CUBIC)
    meadow = np.stack([60 + 50 * noise, 140 + 60 * noise, 50 + 30 * noise], -1)
    img = np.where((y > 190)[..., None], meadow, img)
    img = np.clip(img, 0, 255).astype(np.uint8)
    # A house: walls, roof, door, window.
    cv2.rectangle(img, (250, 150), (310, 200), (225, 205, 170), -1)
    cv2.fillPoly(img, [np.array([[243, 152], [280, 118], [317, 152]], np.int32)], (170, 60, 50), cv2.LINE_AA)
    cv2.rectangle(img, (272, 172), (286, 200), (110, 70, 40), -1)
    cv2.rectangle(img, (256, 160), (268, 171), (120, 190, 230), -1)
    return img


def frame(bg: np.ndarray, i: int) -> np.ndarray:
    cam = int(round(i * PAN))
    img = np.ascontiguousarray(bg[:, cam:cam + W])
    # Sun: far away, so it moves at a tenth of the pan speed (parallax).
    cv2.circle(img, (200 - int(i * PAN * 0.1), 45), 22, (255, 225, 90), -1, cv2.LINE_AA)
    # Bouncing ball (screen space, parabolic bounce).
    t = (i % 20) / 20
    cv2.circle(img, (40 + i * 2, int(215 - 90 * 4 * t * (1 - t))), 13, (220, 40, 60), -1, cv2.LINE_AA)
    cv2.circle(img, (36 + i * 2, int(211 - 90 * 4 * t * (1 - t))), 4, (255, 170, 180), -1, cv2.LINE_AA)
    # Car sliding right to left along the meadow.
    cx = 250 - i * 4
    cv2.rectangle(img, (cx, 222), (cx + 46, 238), (40, 90, 200), -1)
    cv2.rectangle(img, (cx + 10, 211), (cx + 34, 223), (60, 120, 220), -1)
    for wx in (cx + 10, cx + 36):
        cv2.circle(img, (wx, 240), 6, (30, 30, 30), -1, cv2.LINE_AA)
    # Pinwheel spinning on a pole.
    px, py = 120 - cam // 2, 150
    cv2.line(img, (px, py), (px, py + 60), (90, 70, 50), 3)
    for k, col in enumerate([(250, 200, 40), (240, 90, 160), (80, 200, 240), (140, 230, 90)]):
        a = np.deg2rad(i * 15 + k * 90)
        tip = (px + 22 * np.cos(a), py + 22 * np.sin(a))
        side = (px + 16 * np.cos(a + 0.7), py + 16 * np.sin(a + 0.7))
        cv2.fillPoly(img, [np.array([(px, py), tip, side], np.int32)], col, cv2.LINE_AA)
    return img


def chord(seconds: float) -> np.ndarray:
    t = np.arange(int(SR * seconds)) / SR
    tone = sum(np.sin(2 * np.pi * f * t) for f in (220.0, 277.18, 329.63)) / 3
    envelope = np.minimum(1, np.minimum(t / 0.2, (seconds - t) / 0.4))  # fade in/out, no clicks
    left = 0.3 * tone * envelope
    return np.stack([left, 0.8 * left])


def main(out: Path) -> None:
    rng = np.random.default_rng(20240601)
    bg = world_background(rng)
    frames = [frame(bg, i) for i in range(FRAMES)]
    out.parent.mkdir(parents=True, exist_ok=True)
    write_clip(out, frames, FPS, audio=chord(FRAMES / FPS), sample_rate=SR, crf=20)
    print(f"wrote {out} ({out.stat().st_size / 1024:.0f} KB, {FRAMES} frames, {W}x{H} @ {FPS} fps)")


if __name__ == "__main__":
    default = Path(__file__).resolve().parents[1] / "src" / "streamedit" / "assets" / "example.mp4"
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else default)
