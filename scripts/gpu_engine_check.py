"""Steady-state engine timings on a GPU (random:real, bf16): eager vs compiled, pipelined vs sequential.

    python scripts/gpu_engine_check.py --clip CLIP.mp4 --frames 240 --json out.json
"""

import argparse
import json
import statistics
import time

import torch

from streamedit import EngineConfig, StreamEngine, load_models
from streamedit.video.io import open_video


def looped(frames, n):
    return [frames[i % len(frames)] for i in range(n)]


def measure(models, frames, batch, **kw):
    engine = StreamEngine(models, EngineConfig(prompt="oil painting", batch_size=batch, fixed_noise=True,
                                               profile=True, **kw))
    torch.cuda.reset_peak_memory_stats()
    stamps = []
    for _ in engine.run(frames):
        stamps.append(time.perf_counter())
    log = engine.batch_log[1:]  # first batch = warm-up (compile, allocator)
    first = batch  # frames of the first batch
    steady = (len(stamps) - first) / (stamps[-1] - stamps[first - 1])
    comp = {k: statistics.median(e.ms[k] for e in log) for k in log[0].ms}
    walls = [b.t_done - a.t_done for a, b in zip(engine.batch_log[1:], engine.batch_log[2:])]
    return {"config": kw, "batch": batch, "fps": steady, "first_batch_s": engine.batch_log[0].t_done - engine.batch_log[0].t_launch,
            "wall_ms_p50": 1e3 * statistics.median(walls), "component_ms_p50": comp,
            "peak_gib": torch.cuda.max_memory_allocated() / 2**30}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--clip", required=True)
    ap.add_argument("--frames", type=int, default=240)
    ap.add_argument("--json", required=True)
    args = ap.parse_args()
    t = time.perf_counter()
    models = load_models("random:real", device="cuda", dtype=torch.bfloat16)
    print(f"built random:real in {time.perf_counter() - t:.1f} s", flush=True)
    clip = list(open_video(args.clip, size=512).frames())
    frames = looped(clip, args.frames)
    rows = []
    for batch, kw in [(8, dict(pipeline=True)), (8, dict(pipeline=False)), (1, dict(pipeline=True)),
                      (8, dict(pipeline=True, compile=True))]:
        rows.append(measure(models, frames, batch, **kw))
        print(json.dumps(rows[-1]), flush=True)
    json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "rows": rows},
              open(args.json, "w"), indent=2)
    print(f"{'config':<40} {'fps':>7} {'wall p50':>9} {'te':>6} {'enc':>6} {'unet':>6} {'dec':>6} {'peak GiB':>8}")
    for r in rows:
        c = r["component_ms_p50"]
        name = f"B={r['batch']} " + " ".join(f"{k}={v}" for k, v in r["config"].items())
        print(f"{name:<40} {r['fps']:7.1f} {r['wall_ms_p50']:9.1f} {c['te']:6.1f} {c['vae_encode']:6.1f} "
              f"{c['unet']:6.1f} {c['vae_decode']:6.1f} {r['peak_gib']:8.2f}")


if __name__ == "__main__":
    main()
