"""Summarise scripts/stack_sample.py snapshots: per thread, where its samples fell between two snapshots.

    python scripts/stack_report.py AFTER.json [BEFORE.json] [--thread streamedit-ticks] [--top 15]

Per thread (or those whose name contains --thread): its share of the samples, the innermost lines (self) and
the streamedit functions on the stack (inclusive), most samples first.
"""

import argparse
import json
from collections import Counter


def load(path: str | None) -> tuple[int, dict[str, Counter]]:
    if not path:
        return 0, {}
    data = json.load(open(path))
    return data["samples"], {n: Counter(c) for n, c in data["threads"].items()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("after")
    ap.add_argument("before", nargs="?")
    ap.add_argument("--thread", default="")
    ap.add_argument("--top", type=int, default=15)
    a = ap.parse_args()
    n1, t1 = load(a.after)
    n0, t0 = load(a.before)
    samples = max(n1 - n0, 1)
    print(f"{samples} samples")
    for name in sorted(t1):
        if a.thread not in name:
            continue
        stacks = t1[name] - t0.get(name, Counter())
        total = sum(stacks.values())
        if not total:
            continue
        own, inclusive = Counter(), Counter()
        for stack, n in stacks.items():
            frames = stack.split(";")
            own[frames[-1]] += n
            for f in set(f.rsplit(":", 1)[0] for f in frames):
                inclusive[f] += n
        print(f"\n== {name}: {total} samples ({100 * total / samples:.0f} % of the sampler's)")
        print("  self:")
        for f, n in own.most_common(a.top):
            print(f"    {100 * n / total:5.1f} %  {f}")
        print("  inclusive (streamedit and torch frames):")
        shown = [(f, n) for f, n in inclusive.most_common() if not f.startswith(("threading.py", "<frozen", "stack_sample"))]
        for f, n in shown[: a.top]:
            print(f"    {100 * n / total:5.1f} %  {f}")


if __name__ == "__main__":
    main()
