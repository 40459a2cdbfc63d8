#!/usr/bin/env python
"""How fast `stylize`'s own input and output run on a file, without the model: decode + resize to the working
size (video/reader.py, as `stylize` reads), then scale back + encode + audio mux (video/writer.py, as `stylize`
writes, each frame the decoded one). Names the bound of an end-to-end run: if the model path is faster than
these, the file I/O is the bottleneck.

``--model-ms M`` also times `stylize`'s loop shape with the model replaced by a sleep of M ms per frame, taken
once per batch of 8 (a GPU-bound loop leaves the CPU to the other threads as a sleep does), once with every
stage on one thread (``ahead 0, workers 0``: how `stylize` ran before the reader and encoder threads) and once
as `stylize` runs now: the reader decoding ahead, the writer converting and encoding on its own threads (once
per ``--encoder-preset``).

``--x264-threads frame slice`` times the writer with x264's frame threads (the default) and with PyAV's slice
threads (how it ran before).

    python scripts/io_speed.py INPUT [--size 512] [--output /tmp/io-speed.mp4] [--workers 0 4] [--model-ms 5]
"""

import argparse
import itertools
import json
import time

from streamedit.cli.commands import X264_PRESETS
from streamedit.video.io import READ_AHEAD, VideoWriter, open_video


def pipeline(path: str, size: int, output: str, model_ms: float, ahead: int, workers: int | None,
             preset: str = "veryfast", batch: int = 8) -> float:
    """Frames per second of decode -> (model: a sleep per batch) -> write, as `stylize`'s loop runs them."""
    source = open_video(path, size=size)
    n, t0 = 0, time.perf_counter()
    with VideoWriter(output, source, workers=workers, preset=preset) as writer:
        frames = source.frames(ahead=ahead)
        while chunk := list(itertools.islice(frames, batch)):
            time.sleep(model_ms * len(chunk) / 1000)
            for f in chunk:
                writer.write(f)
            n += len(chunk)
    return n / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("input")
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--output", default="/tmp/io-speed.mp4")
    ap.add_argument("--workers", type=int, nargs="*", default=[None],
                    help="VideoWriter threads to time (default: its own default); 0 = synchronous")
    ap.add_argument("--x264-threads", nargs="*", choices=("frame", "slice"), default=["frame"])
    ap.add_argument("--encoder-preset", nargs="*", default=["veryfast"], choices=X264_PRESETS,
                    help="x264 presets to time the writer with (stylize --encoder-preset)")
    ap.add_argument("--model-ms", type=float, default=None,
                    help="also time the stylize loop with the model as a sleep of this many ms per frame")
    a = ap.parse_args()
    t0 = time.perf_counter()
    with open_video(a.input, size=a.size) as source:
        frames = list(source.frames())
    decode = time.perf_counter() - t0
    n, result = len(frames), {"frames": len(frames), "working": list(frames[0].shape[:2]),
                              "decode_resize_fps": round(len(frames) / decode, 1)}
    for workers, threads, preset in itertools.product(a.workers, a.x264_threads, a.encoder_preset):
        source = open_video(a.input, size=a.size)
        t0 = time.perf_counter()
        with VideoWriter(a.output, source, workers=workers, frame_threads=threads == "frame", preset=preset) as writer:
            for f in frames:
                writer.write(f)
        name = f"workers={workers},x264={threads}" + (f",preset={preset}" if len(a.encoder_preset) > 1 else "")
        result[f"scale_encode_mux_fps({name})"] = round(n / (time.perf_counter() - t0), 1)
        source.close()
    if a.model_ms is not None:
        result["model_alone_fps"] = round(1000 / a.model_ms, 1) if a.model_ms else None
        loops = [(0, 0, a.encoder_preset[0])] + [(READ_AHEAD, a.workers[-1], p) for p in a.encoder_preset]
        for ahead, workers, preset in loops:  # every stage on one thread; then as `stylize` runs, per preset
            fps = pipeline(a.input, a.size, a.output, a.model_ms, ahead, workers, preset)
            name = f"ahead={ahead},workers={workers}" + (f",preset={preset}" if len(a.encoder_preset) > 1 else "")
            result[f"stylize_loop_fps({name})"] = round(fps, 1)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
