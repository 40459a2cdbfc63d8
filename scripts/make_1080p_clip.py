#!/usr/bin/env python
"""Build issue 26's end-to-end test file from any clip: 1920x1080, 30 fps, N seconds (default 20), H.264 + AAC.

The source (e.g. a 512x512 DAVIS clip) is scaled to cover 1920x1080 (centre crop) and looped ping-pong (no jump at
the loop) to fill the length; the audio is a soft two-tone chord, so the file has an audio track to keep.

    python scripts/make_1080p_clip.py SOURCE OUTPUT [--seconds 20] [--width 1920 --height 1080]
"""

import argparse

import cv2
import numpy as np

from streamedit.video.clips import read_frames, write_clip

FPS, SR = 30, 48000


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("source")
    ap.add_argument("output")
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--width", type=int, default=1920)
    ap.add_argument("--height", type=int, default=1080)
    a = ap.parse_args()
    W, H = a.width, a.height
    src = read_frames(a.source)
    h, w = src[0].shape[:2]
    scale = max(W / w, H / h)
    sw, sh = round(w * scale), round(h * scale)
    x0, y0 = (sw - W) // 2, (sh - H) // 2
    loop = src + src[-2:0:-1]  # ping-pong
    n = round(a.seconds * FPS)
    frames = (cv2.resize(loop[i % len(loop)], (sw, sh), interpolation=cv2.INTER_CUBIC)[y0:y0 + H, x0:x0 + W]
              for i in range(n))
    t = np.arange(round(a.seconds * SR)) / SR
    audio = 0.2 * np.stack([np.sin(2 * np.pi * 220 * t), np.sin(2 * np.pi * 277.2 * t)]).astype(np.float32)
    write_clip(a.output, frames, fps=FPS, audio=audio, sample_rate=SR, crf=23)
    print(f"{a.output}: {W}x{H}, {FPS} fps, {n} frames, audio {a.seconds} s")


if __name__ == "__main__":
    main()
