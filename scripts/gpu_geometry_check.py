"""Non-square working size on a GPU (random:real, bf16): the compiled, CUDA-graphed engine (fast TE,
staggered LLLite refresh in both flow conventions) at 512x288 against the eager engine, and its speed.

    python scripts/gpu_geometry_check.py --json out.json

Checks (exit 1 on failure): every compiled output has the working shape (288, 512, 3); compiled and eager
outputs agree (mean abs difference, in 8-bit levels, well under the difference between two seeds); a
second compiled engine at 512x512 in the same process still runs (graphs are per working size). Prints
fps for 512x288 and 512x512 with the same flags, so the speed of the smaller frame can be compared.
"""

import argparse
import json
import sys
import time

import numpy as np
import torch

from streamedit import EngineConfig, StreamEngine, load_models
from streamedit.temporal.adapter import LLLiteAdapter


def frames(h, w, n=64):
    yy, xx = np.mgrid[:h, :w]
    return [np.stack([127 + 120 * np.sin((xx + 5 * t) / 23.0), 127 + 120 * np.cos((yy - 3 * t) / 17.0),
                      255.0 * ((xx + yy + 7 * t) % 200) / 200], -1).astype(np.uint8) for t in range(n)]


def run(models, clip, flow, seed=0, **kw):
    adapter = LLLiteAdapter.for_unet(models.unet, hooks="down", cond_size=512, flow=flow)
    with torch.no_grad():
        for _, m in adapter.items():
            m.up[0].weight.normal_(0, 1e-3)
    cfg = EngineConfig(prompt="oil painting", batch_size=8, size=512, seed=seed, fixed_noise=True, lllite=adapter,
                       cond_refresh_every=8, **kw)
    engine = StreamEngine(models, cfg)
    stamps, outs = [], []
    for out in engine.run(clip):
        outs.append(out.copy())
        stamps.append(time.perf_counter())
    engine.close()
    fps = (len(stamps) - 16) / (stamps[-1] - stamps[15])  # after two warm-up batches
    return np.stack(outs), fps, engine.shape


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", required=True)
    args = ap.parse_args()
    models = load_models("random:real", device="cuda", dtype=torch.bfloat16)
    fast = dict(te_fast=True, compile=True, cond_stagger=True, flow_size=256, main_priority=True)
    wide, square = frames(288, 512), frames(512, 512)
    rows, ok = [], True
    for flow in ("backward", "forward"):
        compiled, fps, shape = run(models, wide, flow, **fast)
        eager, _, _ = run(models, wide, flow)
        other_seed, _, _ = run(models, wide, flow, seed=1)
        diff = float(np.abs(compiled.astype(int) - eager).mean())
        seeds = float(np.abs(eager.astype(int) - other_seed).mean())
        good = shape == (288, 512) and compiled.shape[1:] == (288, 512, 3) and diff < 0.25 * seeds
        ok &= good
        rows.append({"flow": flow, "shape": shape, "fps_512x288": fps, "compiled_vs_eager": diff,
                     "seed_vs_seed": seeds, "ok": good})
        print(json.dumps(rows[-1]), flush=True)
    _, fps_sq, shape_sq = run(models, square, "backward", **fast)
    ok &= shape_sq == (512, 512)
    rows.append({"flow": "backward", "shape": shape_sq, "fps_512x512": fps_sq})
    print(json.dumps(rows[-1]), flush=True)
    json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": rows, "ok": ok},
              open(args.json, "w"), indent=2)
    print("OK" if ok else "FAILED")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
