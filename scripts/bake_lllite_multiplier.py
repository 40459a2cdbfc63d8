"""Bake an adapter strength into an LLLite file: ``--lllite-multiplier M`` becomes the file's own output.

Each hook's output is ``up(h) * multiplier``; scaling the ``up`` projection (weight and bias) by M gives
the same output at multiplier 1, so the file runs at its tuned strength without a flag (the bundled
demo adapter is baked this way, docs/demo-model.md). Usage:

    python scripts/bake_lllite_multiplier.py IN.safetensors OUT.safetensors M [--model demo]
"""

import argparse

import torch

from streamedit.cli.options import load
from streamedit.temporal.adapter import LLLiteAdapter


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("src")
    ap.add_argument("dst")
    ap.add_argument("multiplier", type=float)
    ap.add_argument("--model", default="demo", help="a model with the U-Net the adapter was trained for")
    args = ap.parse_args()
    unet = load(args.model, None, "cpu", torch.float32).unet
    adapter = LLLiteAdapter.load(args.src, unet)
    with torch.no_grad():
        for module in adapter.lllite.values():
            module.up[0].weight.mul_(args.multiplier)
            module.up[0].bias.mul_(args.multiplier)
    adapter.save(args.dst)
    print(f"{args.dst}: {len(adapter.lllite)} hooks, up projections x {args.multiplier}")


if __name__ == "__main__":
    main()
