"""Run a module with a sampling profiler of its Python threads (no ptrace: sys._current_frames() from a thread).

    python scripts/stack_sample.py OUT.json -m streamedit serve ...

Every ``STACK_SAMPLE_MS`` (default 5) ms each live thread's stack (the innermost 14 frames) is counted under the
thread's name; every 5 s and at exit the counts so far (cumulative, with the sample count and wall time) are
written to OUT.json, so a kept server can be read between load runs (diff two snapshots for one run). Where the
engine's tick thread spends its wall time (launch parts, lock waits, the GIL held by others: a frame that stays
on a line that should be quick) is what issue 25's host-launch question needs; each sample holds the
GIL briefly (tuples of code objects, formatted only when written).
"""

import json
import os
import runpy
import sys
import threading
import time
from collections import Counter, defaultdict


def _frame_key(frame, depth: int = 14) -> tuple:
    """The stack as (code, line) pairs, innermost last (formatted only when written: sampling holds the GIL)."""
    parts = []
    while frame is not None and len(parts) < depth:
        parts.append((frame.f_code, frame.f_lineno))
        frame = frame.f_back
    return tuple(reversed(parts))


def _name(key: tuple) -> str:
    return ";".join(f"{os.path.basename(c.co_filename)}:{c.co_name}:{line}" for c, line in key)


def main() -> None:
    out, args = sys.argv[1], sys.argv[2:]
    if len(args) < 2 or args[0] != "-m":
        sys.exit("usage: stack_sample.py OUT.json -m MODULE [ARGS...]")
    period = float(os.environ.get("STACK_SAMPLE_MS", "5")) / 1e3
    counts: dict[str, Counter] = defaultdict(Counter)
    state = {"samples": 0, "t0": time.time()}

    def dump() -> None:
        data = {"samples": state["samples"], "seconds": time.time() - state["t0"], "period_ms": period * 1e3,
                "threads": {n: {_name(k): v for k, v in c.most_common(400)} for n, c in list(counts.items())}}
        tmp = out + ".tmp"
        with open(tmp, "w") as f:
            json.dump(data, f)
        os.replace(tmp, out)

    def sample() -> None:
        me, last_dump = threading.get_ident(), time.time()
        while True:
            time.sleep(period)
            names = {t.ident: t.name for t in threading.enumerate()}
            for ident, frame in sys._current_frames().items():
                if ident != me:
                    counts[names.get(ident, str(ident))][_frame_key(frame)] += 1
            state["samples"] += 1
            if time.time() - last_dump > 5:
                dump()
                last_dump = time.time()

    threading.Thread(target=sample, name="stack-sampler", daemon=True).start()
    sys.argv = [args[1], *args[2:]]
    try:
        runpy.run_module(args[1], run_name="__main__", alter_sys=True)
    finally:
        dump()


if __name__ == "__main__":
    main()
