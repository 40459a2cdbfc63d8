"""GPU check of the text-encoder features and views (issue 22): compiled + CUDA-graphed fast TE against the
exact runner at te_size 512 and 256, and the compiled engine (mask into the U-Net graph) against eager.

    PYTHONPATH=src python scripts/gpu_te_size_check.py [--model random:real] [--json out.json]

Prints one JSON object: per te_size the max |fast - exact| of the TE output (pre-norm features, bf16), the
max pixel difference compiled vs eager engine, and the compiled engine's steady fps at 512², B=8.
"""

import argparse
import json
import time

import numpy as np
import torch

from streamedit import EngineConfig, StreamEngine, load_models
from streamedit.accel.compile_te import compile_te
from streamedit.text.exact import TextEncoderRunner
from streamedit.text.fast import FastTextEncoderRunner


def frames(n, size=512):
    yy, xx = np.mgrid[0:size, 0:size] * (64.0 / size)
    return [np.stack([127 + 120 * np.sin((xx + 7 * t) / 5.0), 127 + 120 * np.cos((yy - 5 * t) / 6.0),
                      255.0 * ((xx + yy + 11 * t) % 64) / 64], -1).astype(np.uint8) for t in range(n)]


def run(models, clip, **kw):
    engine = StreamEngine(models, EngineConfig(prompt="oil painting", batch_size=8, fixed_noise=True, **kw))
    stamps, outs = [], []
    for out in engine.run(clip):
        outs.append(out)
        stamps.append(time.perf_counter())
    engine.close()
    return outs, (len(stamps) - 16) / (stamps[-1] - stamps[15])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="random:real")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    models = load_models(args.model, device="cuda", dtype=torch.bfloat16)
    clip = frames(96)
    report = {"model": args.model, "device": torch.cuda.get_device_name()}
    for te_size in (512, 256):
        exact = TextEncoderRunner(models, te_size=te_size)
        ref = exact.encode("oil painting", exact.prepare_images(clip[:8]), 8).float()
        fast = compile_te(FastTextEncoderRunner(models, 8, te_size=te_size), "reduce-overhead")
        host = fast.prepare_images(clip[:8])
        out = [fast.encode("oil painting", host, 8).float() for _ in range(3)][-1]
        eager, _ = run(models, clip[:32], te_size=te_size)
        compiled, fps = run(models, clip, te_size=te_size, te_fast=True, compile=True)
        report[f"te_size_{te_size}"] = {
            "te_fast_vs_exact_max_abs": float((out - ref).abs().max()), "te_ref_rms": float(ref.pow(2).mean().sqrt()),
            "engine_compiled_vs_eager_max_px": int(max(np.abs(a.astype(int) - b).max()
                                                       for a, b in zip(eager, compiled[:32]))),
            "engine_compiled_fps": fps}
    print(json.dumps(report, indent=2))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(report, fh, indent=2)


if __name__ == "__main__":
    main()
