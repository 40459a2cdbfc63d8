"""GPU checks for `train base` and the engine's stream priority (run on the device before a training run).

1. a graphed U-Net training step computes what the eager one does, also with --joint-decoder
   (tests/test_train_base.py's CUDA test);
2. eager vs graphed step time at the demo size (random:demo, batches 128 and 512, 256²);
3. the engine's outputs with ``main_priority`` equal those without (random:demo, bf16, fixed noise).

    python scripts/gpu_train_check.py --json OUT.json
"""

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))


def step_times(batch: int, steps: int = 10) -> dict:
    from test_train_base import _tiny_training_data

    from streamedit.train.base import BaseTrainConfig
    from streamedit.train.unet import UNetStep

    size = 256
    models, data = _tiny_training_data("cuda", n=256, size=size, arch="demo", workers=None)
    cfg = BaseTrainConfig(size=size, unet_batch=batch)
    models.unet.train().requires_grad_(True)
    step = UNetStep(models, data, cfg, 0.2, 200.0)
    gen = torch.Generator("cuda").manual_seed(0)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for i in range(8):
            step.draw(gen)
            step.eager(i % 4)
    torch.cuda.current_stream().wait_stream(side)
    out = {}
    for name, fn in (("eager", step.eager), ("graphed", step.graphed)):
        for i in range(4):  # captures happen here
            step.draw(gen)
            fn(i % 4)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for i in range(steps):
            step.draw(gen)
            fn(i % 4)
        torch.cuda.synchronize()
        out[f"{name}_ms"] = (time.perf_counter() - t0) / steps * 1e3
    out["speedup"] = out["eager_ms"] / out["graphed_ms"]
    out["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
    return out


def priority_equal() -> dict:
    from streamedit import EngineConfig, StreamEngine, load_models

    models = load_models("random:demo", device="cuda", dtype=torch.bfloat16)
    rng = np.random.default_rng(0)
    frames = [(rng.random((256, 256, 3)) * 255).astype(np.uint8) for _ in range(16)]
    outs = {}
    for prio in (False, True):
        engine = StreamEngine(models, EngineConfig(prompt="oil painting", batch_size=4, size=256, fixed_noise=True,
                                                   main_priority=prio, lllite="random"))
        outs[prio] = np.stack(list(engine.run(frames)))
        engine.close()
    return {"max_abs_diff": int(np.abs(outs[True].astype(int) - outs[False]).max())}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", required=True)
    args = ap.parse_args()
    import test_train_base

    result = {"device": torch.cuda.get_device_name()}
    t0 = time.perf_counter()
    for joint in (False, True):
        test_train_base.test_graphed_unet_step_equals_the_eager_step(joint)
    result["graphed_equals_eager"] = {"passed": True, "s": time.perf_counter() - t0}
    result["priority"] = priority_equal()
    for batch in (128, 512):
        result[f"step_b{batch}"] = step_times(batch)
    Path(args.json).write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
