"""U-Net cost of the LLLite adapter on a GPU: real-size U-Net (random:real), 512^2, B=8, bf16,
torch.compile(mode="reduce-overhead") (CUDA graphs). For no adapter / down (38 hooks) / all (108):
U-Net ms per batch on reuse batches (cond embedding kept), cond-CNN ms on refresh batches, and the
number of recompiles over 50 batches whose cond images change every batch.

    python scripts/gpu_lllite_check.py --json out.json
"""

import argparse
import json
import statistics
import time

import torch
import torch._dynamo
from torch._dynamo.utils import counters

from streamedit import load_models
from streamedit.temporal.adapter import LLLiteAdapter, apply_lllite, remove_lllite

B, SIZE, TOKENS = 8, 512, 299  # TE output tokens for the edit template at 512^2 (363 - 64 prefix)


def timed(fn):
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", required=True)
    ap.add_argument("--batches", type=int, default=50)
    args = ap.parse_args()
    models = load_models("random:real", device="cuda", dtype=torch.bfloat16)
    unet = models.unet
    latent = SIZE // 8
    sample = torch.randn(B, 4, latent, 2 * latent, device="cuda", dtype=torch.bfloat16)
    kw = dict(timestep=torch.full((B,), 1000.0, device="cuda", dtype=torch.bfloat16),
              encoder_hidden_states=torch.randn(B, TOKENS, 2048, device="cuda", dtype=torch.bfloat16),
              added_cond_kwargs={"time_ids": torch.full((B, 2), float(SIZE), device="cuda", dtype=torch.bfloat16)},
              return_dict=False)
    rows = []
    for hooks in ("none", "down", "all"):
        torch._dynamo.reset()
        counters.clear()
        adapter = None
        if hooks != "none":
            adapter = LLLiteAdapter.for_unet(unet, hooks=hooks, cond_size=SIZE)
            with torch.no_grad():
                for _, m in adapter.items():
                    m.up[0].weight.normal_(0, 1e-3)
            apply_lllite(unet, adapter, inference_mode=True)
            adapter.allocate(B, SIZE, SIZE)
            adapter.set_cond_image(torch.randint(0, 255, (B, 3, SIZE, SIZE), device="cuda", dtype=torch.uint8))
        compiled = torch.compile(unet, mode="reduce-overhead")
        t0 = time.perf_counter()
        with torch.no_grad():
            for _ in range(3):
                compiled(sample, **kw)
        torch.cuda.synchronize()
        compile_s = time.perf_counter() - t0
        frames_before = counters["stats"]["unique_graphs"]
        unet_ms, cond_ms = [], []
        with torch.no_grad():
            for i in range(args.batches):
                if adapter is not None:  # a refresh batch: new cond images every time
                    cond = torch.randint(0, 255, (B, 3, SIZE, SIZE), device="cuda", dtype=torch.uint8)
                    cond_ms.append(timed(lambda: adapter.set_cond_image(cond)))
                    adapter.set_multiplier(0.5 + 0.01 * i)
                unet_ms.append(timed(lambda: compiled(sample, **kw)))
        recompiles = counters["stats"]["unique_graphs"] - frames_before
        row = {"hooks": hooks, "n_hooks": len(adapter.hooks) if adapter else 0, "compile_s": compile_s,
               "unet_ms_p50": statistics.median(unet_ms), "unet_ms_min": min(unet_ms),
               "cond_cnn_ms_p50": statistics.median(cond_ms) if cond_ms else 0.0,
               "graph_breaks": sum(counters["graph_break"].values()), "recompiles_over_batches": recompiles,
               "batches": args.batches}
        row["refresh_batch_ms"] = row["unet_ms_p50"] + row["cond_cnn_ms_p50"]
        rows.append(row)
        print(json.dumps(row), flush=True)
        if adapter is not None:
            remove_lllite(unet)
    base = rows[0]["unet_ms_p50"]
    for r in rows:
        r["reuse_overhead_ms_per_frame"] = (r["unet_ms_p50"] - base) / B
    json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__, "B": B, "size": SIZE,
               "rows": rows}, open(args.json, "w"), indent=2)
    print(f"{'hooks':<6} {'n':>4} {'unet ms (reuse)':>16} {'cond CNN ms':>12} {'refresh ms':>11} "
          f"{'+ms/frame':>10} {'recompiles':>10} {'breaks':>7} {'compile s':>9}")
    for r in rows:
        print(f"{r['hooks']:<6} {r['n_hooks']:>4} {r['unet_ms_p50']:>16.2f} {r['cond_cnn_ms_p50']:>12.2f} "
              f"{r['refresh_batch_ms']:>11.2f} {r['reuse_overhead_ms_per_frame']:>10.3f} "
              f"{r['recompiles_over_batches']:>10} {r['graph_breaks']:>7} {r['compile_s']:>9.1f}")


if __name__ == "__main__":
    main()
