"""The multi-stream engine on a GPU (issue 25): equivalence with per-stream StreamEngines, graph captures per
bucket, and a paced load of K streams (served fps, latency, drops, batch histogram, memory).

    python scripts/gpu_multistream_check.py --streams 4 --compile --te-fast --json multistream.json
    python scripts/gpu_multistream_check.py --streams 4 --compile --te-fast --lllite random --json ms-lllite.json
    # CPU smoke run of the script itself:
    python scripts/gpu_multistream_check.py --model random:tiny --device cpu --dtype float32 --size 64 \\
        --streams 3 --frames 3 --seconds 3 --fps 2 --json /tmp/ms.json
"""

import argparse
import json
import threading
import time

import numpy as np
import torch

from streamedit import EngineConfig, StreamEngine, load_models
from streamedit.accel import graphs
from streamedit.engine.multi import MultiStreamEngine
from streamedit.temporal.adapter import LLLiteAdapter

PROMPTS = ("oil painting", "watercolor", "pencil sketch", "cartoon")


def pattern(k: int, t: int, size: int) -> np.ndarray:
    yy, xx = np.mgrid[0:size, 0:size] * (64.0 / size)
    r = 127 + 120 * np.sin((xx + 3 * t + 11 * k) / (5.0 + 3 * k))
    g = 127 + 120 * np.cos((yy - 2 * t * (k + 1)) / (7.0 + k))
    b = 255.0 * ((xx * (k + 1) + yy + 5 * t) % 64) / 64
    return np.stack([r, g, b], -1).astype(np.uint8)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def equivalence(models, cfg: dict, streams: int, frames: int) -> list[dict]:
    """Each stream of a multi-stream engine against a batch-1 StreamEngine with its prompt and seed."""
    clips = [[pattern(k, t, cfg["size"]) for t in range(frames)] for k in range(streams)]
    with MultiStreamEngine(models, EngineConfig(prompt=PROMPTS[0], **cfg)) as engine:
        handles = [engine.open_stream(PROMPTS[k % len(PROMPTS)], seed=k) for k in range(streams)]
        got = [[] for _ in handles]
        for t in range(frames):
            for k, s in enumerate(handles):
                s.submit(clips[k][t])
            engine.tick()
            for k, s in enumerate(handles):
                got[k].append(s.get(timeout=600).image)
    rows = []
    for k in range(streams):
        single = dict(cfg, batch_size=1)
        with StreamEngine(models, EngineConfig(prompt=PROMPTS[k % len(PROMPTS)], seed=k, **single)) as ref:
            want = list(ref.run(clips[k]))
        diff = [np.abs(a.astype(np.int16) - b.astype(np.int16)) for a, b in zip(got[k], want)]
        rows.append(dict(stream=k, max_diff=int(max(d.max() for d in diff)),
                         frac_over_1=float(np.mean([(d > 1).mean() for d in diff]))))
        print(json.dumps(rows[-1]), flush=True)
    return rows


def load(models, cfg: dict, streams: int, fps: float, seconds: float) -> dict:
    """K feeders at ``fps`` each against the tick thread; graphs captured up front (prepare(warm=True))."""
    engine = MultiStreamEngine(models, EngineConfig(prompt=PROMPTS[0], **cfg), max_streams=streams)
    t0 = time.perf_counter()
    engine.prepare((cfg["size"], cfg["size"]), warm=True)
    sync(models.device)
    warm_s = time.perf_counter() - t0
    captures0 = sum(d.fused.captures for g in engine._groups.values() for d in g.denoisers.values()
                    if isinstance(d.fused, graphs.StaticGraph))
    if models.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    handles = [engine.open_stream(PROMPTS[k % len(PROMPTS)], seed=k) for k in range(streams)]
    engine.start()
    stop = threading.Event()

    def feed(k, s):
        t, period = 0, 1.0 / fps
        next_at = time.perf_counter()
        while not stop.is_set():
            s.submit(pattern(k, t, cfg["size"]))
            t += 1
            next_at += period
            time.sleep(max(0.0, next_at - time.perf_counter()))

    feeders = [threading.Thread(target=feed, args=(k, s)) for k, s in enumerate(handles)]
    for f in feeders:
        f.start()
    time.sleep(seconds)
    stop.set()
    for f in feeders:
        f.join()
    engine.stop()
    captures = sum(d.fused.captures for g in engine._groups.values() for d in g.denoisers.values()
                   if isinstance(d.fused, graphs.StaticGraph))
    report = engine.report()
    report.update(warm_s=warm_s, warm_seconds={f"{s[0]}x{s[1]}/B{b}": v for (s, b), v in engine.warm_seconds.items()},
                  main_graph_captures_after_warm=captures - captures0, error=repr(engine.error),
                  served_fps={k: s.stats.processed / seconds for k, s in enumerate(handles)},
                  peak_gib=(torch.cuda.max_memory_allocated() / 2**30 if models.device.type == "cuda" else None))
    engine.close()
    return report


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="random:real")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--batch", type=int, default=8, help="largest bucket")
    ap.add_argument("--streams", type=int, default=4)
    ap.add_argument("--frames", type=int, default=8, help="frames per stream for the equivalence check")
    ap.add_argument("--fps", type=float, default=30.0)
    ap.add_argument("--seconds", type=float, default=30.0)
    ap.add_argument("--compile", action="store_true")
    ap.add_argument("--te-fast", action="store_true")
    ap.add_argument("--lllite", default=None)
    ap.add_argument("--json", required=True)
    args = ap.parse_args()
    models = load_models(args.model, device=args.device, dtype=getattr(torch, args.dtype))
    lllite = args.lllite
    if lllite == "random":  # one adapter object for every engine here: the same weights in each comparison
        torch.manual_seed(0)
        lllite = LLLiteAdapter.for_unet(models.unet, hooks="down", cond_size=args.size)
        with torch.no_grad():
            for _, module in lllite.items():
                module.up[0].weight.normal_(0, 1e-2)
    cfg = dict(batch_size=args.batch, size=args.size, fixed_noise=True, compile=args.compile, te_fast=args.te_fast,
               lllite=lllite)
    name = torch.cuda.get_device_name() if models.device.type == "cuda" else "cpu"
    out = dict(device=str(models.device), name=name, torch=torch.__version__, args=vars(args))
    out["equivalence"] = equivalence(models, cfg, args.streams, args.frames)
    out["load"] = load(models, cfg, args.streams, args.fps, args.seconds)
    print(json.dumps(out["load"], indent=1, default=str), flush=True)
    json.dump(out, open(args.json, "w"), indent=2, default=str)


if __name__ == "__main__":
    main()
