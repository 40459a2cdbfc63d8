"""Issue 25: how long a refresh flow (``cond_flow`` at the exact preset's 256 px, 512² frames) takes on this
host's CPU: alone; four at once on a pool (four refreshing streams); and on a pool thread while other Python
threads keep the GIL busy (a server's WebRTC and tick threads), for three ``sys.setswitchinterval`` values.
Why: a refresh tick's launch waited 31-38 ms at p95 in its `cond` part on an H200 host (2026-12-07). On an
H100 host a flow took 25 ms alone and 141-181 ms p50 beside two busy threads at the default 5 ms interval,
45-47 ms at 0.5 ms (docs/benchmarks.md, eleventh session): `serve` now runs at 0.5 ms
(serve/shared.py). Prints one JSON line ([p50, p95] in ms).

    PYTHONPATH=src python scripts/flow_probe.py
"""
import json
import os
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import cv2
import numpy as np

from streamedit.temporal.conditioner import cond_flow


def p50_p95(fn, n=20):
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        out.append(1e3 * (time.perf_counter() - t0))
    return [round(float(np.percentile(out, q)), 2) for q in (50, 95)]


def main() -> None:
    rng = np.random.default_rng(0)
    a = cv2.GaussianBlur(rng.integers(0, 255, (512, 512, 3), dtype=np.uint8), (7, 7), 2)
    b = np.roll(a, 3, axis=1)
    pool = ThreadPoolExecutor(4)
    res = {"cpus": os.cpu_count(), "cv2_threads": cv2.getNumThreads(),
           "alone": p50_p95(lambda: cond_flow(a, b, 256)),
           "pool4": p50_p95(lambda: [f.result() for f in [pool.submit(cond_flow, a, b, 256) for _ in range(4)]])}
    threads = cv2.getNumThreads()
    for n in (1, 2, 4):  # does OpenCV's own threading help a 256 px Farnebäck?
        cv2.setNumThreads(n)
        res[f"alone_t{n}"] = p50_p95(lambda: cond_flow(a, b, 256))
    cv2.setNumThreads(threads)
    stop = threading.Event()

    def spin():  # pure Python: holds the GIL until the interpreter makes it switch
        x = 0
        while not stop.is_set():
            x += 1

    spinners = [threading.Thread(target=spin, daemon=True) for _ in range(2)]
    for t in spinners:
        t.start()
    for interval in (0.005, 0.001, 0.0005, 0.0002):
        sys.setswitchinterval(interval)
        res[f"gil_busy_si{interval}"] = p50_p95(lambda: pool.submit(cond_flow, a, b, 256).result())
    sys.setswitchinterval(0.005)
    stop.set()
    print(json.dumps(res))


if __name__ == "__main__":
    main()
