"""Where a multi-stream tick's host time goes (issue 25): K streams of moving frames, ticks run one at a time
(tick(), as the engine thread's launch + hand-out), the exact preset's host path (fast TE, flows at 256,
the 38-hook adapter) without compiling, under cProfile; prints the per-tick records and the top functions.

    python scripts/gpu_tick_profile.py --streams 4 --ticks 40 --json $OUT/tick-profile.json
    python scripts/gpu_tick_profile.py --model random:tiny --device cpu --dtype float32 --size 64 --ticks 4 \\
        --json /tmp/tp.json   # CPU smoke run
"""

import argparse
import cProfile
import io
import json
import pstats
import time

import numpy as np
import torch

from streamedit import EngineConfig, load_models
from streamedit.config import PRESETS
from streamedit.engine.multi import MultiStreamEngine
from streamedit.temporal.adapter import LLLiteAdapter

PROMPTS = ("oil painting", "watercolor", "pencil sketch", "charcoal drawing", "pop art poster", "pixel art")


def moving(k: int, t: int, size: int) -> np.ndarray:
    yy, xx = np.mgrid[0:size, 0:size] * (64.0 / size)
    r = 127 + 120 * np.sin((xx + 3 * t + 11 * k) / (5.0 + 3 * k))
    g = 127 + 120 * np.cos((yy - 2 * t * (k + 1)) / (7.0 + k))
    return np.stack([r, g, (r + g) / 2], -1).astype(np.uint8)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="random:real")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--streams", type=int, default=4)
    ap.add_argument("--ticks", type=int, default=40)
    ap.add_argument("--json", required=True)
    args = ap.parse_args()
    t0 = time.perf_counter()
    models = load_models(args.model, device=args.device, dtype=getattr(torch, args.dtype))
    torch.manual_seed(0)
    adapter = LLLiteAdapter.for_unet(models.unet, hooks="down", cond_size=args.size)
    cfg = dict(PRESETS["exact"], compile=False, compile_vae=False)
    config = EngineConfig(prompt=PROMPTS[0], batch_size=4, size=args.size, fixed_noise=True, lllite=adapter, **cfg)
    engine = MultiStreamEngine(models, config, max_streams=args.streams)
    engine.prepare((args.size, args.size), warm=True)
    print(f"loaded and warmed in {time.perf_counter() - t0:.1f} s", flush=True)
    streams = [engine.open_stream(PROMPTS[k % len(PROMPTS)], seed=k) for k in range(args.streams)]
    frames = [[moving(k, t, args.size) for t in range(args.ticks + 4)] for k in range(args.streams)]
    for t in range(4):  # every stream past its first (no-flow) refresh
        for k, s in enumerate(streams):
            s.submit(frames[k][t])
        while engine.tick():
            pass
    prof = cProfile.Profile()
    prof.enable()
    for t in range(4, args.ticks + 4):
        for k, s in enumerate(streams):
            s.submit(frames[k][t])
        while engine.tick():
            pass
    prof.disable()
    records = [dict(rows=sum(x is not None for x in r.streams), launch_ms=round(r.launch_ms, 2),
                    wait_ms=round(r.wait_ms, 2), tick_ms=round(1e3 * (r.t_done - r.t_launch), 2),
                    te_calls=r.te_calls, cond_rows=r.cond_rows) for r in list(engine.tick_log)[-args.ticks:]]
    text = io.StringIO()
    pstats.Stats(prof, stream=text).sort_stats("cumulative").print_stats(45)
    out = dict(device=torch.cuda.get_device_name() if models.device.type == "cuda" else "cpu",
               args=vars(args), records=records, report=engine.report()["ticks"], profile=text.getvalue())
    engine.close()
    with open(args.json, "w") as f:
        json.dump(out, f, indent=1)
    print(text.getvalue()[:9000])
    for r in records[:12]:
        print(json.dumps(r))
    print(json.dumps(out["report"]))


if __name__ == "__main__":
    main()
