"""Warm starts with and without one EngineConfig change, on one compile cache (same machine, same artifacts).

    python scripts/gpu_startup_ab.py OUT.jsonl [--set warm_on_worker=False]

`streamedit bench --startup-only` (best row, random:real, bf16, 512², B=8) with five launches on one fresh
cache folder instead of two: cold, then B, A, B2, A2 alternating, where A is the config as is and B has
the --set change (it must not change the compiled graphs, or B recompiles). Each launch's report is one key of
the startup row in OUT.jsonl (`cold`, `b`, `warm`, `b2`, `warm2`). Meant for the GPU machine, with Python's
bytecode cache on (see scripts/gpu_speed.py, part S).
"""

from __future__ import annotations

import argparse
import json
import sys

import streamedit.bench.startup as startup
from streamedit.cli.group import main

ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
ap.add_argument("json_path")
ap.add_argument("--set", dest="change", default="warm_on_worker=False", help="FIELD=VALUE (a JSON value)")
args = ap.parse_args()
field, value = args.change.split("=", 1)
value = json.loads(value.lower() if value in ("True", "False") else value)
measure = startup.measure_startup
startup.measure_startup = lambda *a, **k: measure(*a, launches=("cold", "b", "warm", "b2", "warm2"),
                                                  overrides={"b": {field: value}, "b2": {field: value}}, **k)
sys.argv = ["streamedit", "bench", "--model", "random:real", "--device", "cuda", "--dtype", "bfloat16", "--size",
            "512", "--batch", "8", "--lllite", "random", "--hooks", "down", "--cond-refresh", "8", "--source-fps", "0",
            "--rows", "best", "--startup-only", "--json", args.json_path]
main()
