#!/usr/bin/env python
"""How fast `stylize`'s own input and output run on a file, without the model: decode + resize to the working
size (video/reader.py, as `stylize` reads), then scale back + encode + audio mux (video/writer.py, as `stylize`
writes, each frame the decoded one). Names the bound of an end-to-end run: if the model path is faster than
these, the file I/O is the bottleneck.

    python scripts/io_speed.py INPUT [--size 512] [--output /tmp/io-speed.mp4]
"""

import argparse
import json
import time

from streamedit.video.io import VideoWriter, open_video


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("input")
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--output", default="/tmp/io-speed.mp4")
    ap.add_argument("--workers", type=int, nargs="*", default=[None],
                    help="VideoWriter conversion threads to time (default: its own default); 0 = synchronous")
    a = ap.parse_args()
    t0 = time.perf_counter()
    with open_video(a.input, size=a.size) as source:
        frames = list(source.frames())
    decode = time.perf_counter() - t0
    n, result = len(frames), {"frames": len(frames), "working": list(frames[0].shape[:2]),
                              "decode_resize_fps": round(len(frames) / decode, 1)}
    for workers in a.workers:
        source = open_video(a.input, size=a.size)
        t0 = time.perf_counter()
        with VideoWriter(a.output, source, workers=workers) as writer:
            for f in frames:
                writer.write(f)
        result[f"scale_encode_mux_fps(workers={workers})"] = round(n / (time.perf_counter() - t0), 1)
        source.close()
    print(json.dumps(result))


if __name__ == "__main__":
    main()
