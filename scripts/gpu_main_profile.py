"""Where the main stream's time goes (issue #5): the U-Net + VAE decode at 512², B=8, random:real, bf16.

    python scripts/gpu_main_profile.py [--variants base,bench,cl,flags] [--out $OUT]

Eager: the U-Net (38-hook down adapter attached) and the decoder timed alone, with cudnn's heuristics
and with ``cudnn.benchmark``, the U-Net NCHW and channels_last; the eager U-Net's top kernels.
Compiled: the engine's fused ``Denoiser.generate`` graph (``reduce-overhead``) timed alone per variant,
each after ``torch._dynamo.reset()``:

  base    as the engine compiles it today
  bench   + torch.backends.cudnn.benchmark
  cl      + the U-Net's weights channels_last
  flags   + inductor conv_1x1_as_mm, coordinate_descent_tuning, epilogue_fusion off

Every variant's output is compared with ``base`` (max abs difference of the uint8 frames).
Writes $OUT/main-profile.json and prints a table. Diagnostics only: speed claims come from the bench.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
import torch

from streamedit.accel.compile_main import compile_denoiser
from streamedit.config import EngineConfig
from streamedit.diffusion.denoiser import Denoiser
from streamedit.models.loading import load_models
from streamedit.temporal.attach import attach_adapter
from streamedit.text.exact import TextEncoderRunner


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def cuda_ms(fn, reps: int = 20, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    sync()
    t0 = time.perf_counter()  # a stream of queued launches: the wall equals the GPU span
    for _ in range(reps):
        fn()
    sync()
    return (time.perf_counter() - t0) * 1000 / reps


def top_kernels(fn, n: int = 25, reps: int = 3) -> list[dict]:
    from torch.profiler import ProfilerActivity, profile

    fn()
    sync()
    with profile(activities=[ProfilerActivity.CUDA if torch.cuda.is_available() else ProfilerActivity.CPU]) as prof:
        for _ in range(reps):
            fn()
        sync()
    rows = []
    for evt in prof.key_averages():
        ms = (evt.device_time_total or (0 if torch.cuda.is_available() else evt.self_cpu_time_total)) / 1000 / reps
        if ms > 0:
            rows.append({"kernel": evt.key[:110], "ms": round(ms, 3), "calls": evt.count // reps})
    rows.sort(key=lambda r: -r["ms"])
    total = sum(r["ms"] for r in rows)
    return [{"total_ms": round(total, 2)}] + rows[:n]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--variants", default="base,bench,cl,flags")
    ap.add_argument("--out", default=os.environ.get("OUT", "out"))
    ap.add_argument("--skip-eager", action="store_true")
    ap.add_argument("--te", action="store_true", help="also time the eager TE and the compiled fast TE alone")
    ap.add_argument("--model", default="random:real", help="random:tiny + --device cpu: a smoke test")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--size", type=int, default=512)
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cuda = args.device == "cuda"
    res: dict = {"device": torch.cuda.get_device_name() if cuda else "cpu", "torch": torch.__version__}

    def save():
        (out / "main-profile.json").write_text(json.dumps(res, indent=1))

    t0 = time.perf_counter()
    models = load_models(args.model, device=args.device, dtype=torch.bfloat16 if cuda else torch.float32)
    config = EngineConfig(prompt="oil painting", lllite="random", hooks="down", compile=True, size=args.size)
    attach_adapter(models, config.temporal, config.size)
    rng = np.random.default_rng(0)
    frames = [rng.integers(0, 256, (args.size, args.size, 3), dtype=np.uint8) for _ in range(8)]
    te = TextEncoderRunner(models)
    with torch.no_grad():
        embeds = te.encode(config.prompt, te.prepare_images(frames), 8)
    den = Denoiser(models, 1, args.size)
    u8 = torch.from_numpy(np.stack(frames)).to(args.device)
    with torch.no_grad():
        src = den.encode_source(u8)
    noise = torch.randn_like(src)
    res["shapes"] = {"embeds": list(embeds.shape), "latents": list(src.shape)}
    res["load_s"] = round(time.perf_counter() - t0, 1)
    print("loaded", res["shapes"], res["load_s"], "s", flush=True)
    unet, vae = models.unet, den.vae
    x = torch.cat([noise, src], dim=3)
    t = den.timesteps[0].expand(8)
    ids = den.time_ids.expand(8, -1)
    lat = noise

    def run_unet():
        with torch.no_grad():
            unet(x, timestep=t, encoder_hidden_states=embeds, added_cond_kwargs={"time_ids": ids}, return_dict=False)

    def run_decode():
        with torch.no_grad():
            den.decode(lat)

    if not args.skip_eager:
        eager = {}
        for bench in (False, True):
            torch.backends.cudnn.benchmark = bench
            eager[f"unet_nchw_bench{int(bench)}"] = cuda_ms(run_unet)
            eager[f"decode_nchw_bench{int(bench)}"] = cuda_ms(run_decode)
        unet.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
        den.vae = vae.to(memory_format=torch.channels_last)
        for bench in (False, True):
            torch.backends.cudnn.benchmark = bench
            eager[f"unet_cl_bench{int(bench)}"] = cuda_ms(run_unet)
            eager[f"decode_cl_bench{int(bench)}"] = cuda_ms(run_decode)
        res["eager_ms"] = {k: round(v, 2) for k, v in eager.items()}
        torch.backends.cudnn.benchmark = False
        unet.to(memory_format=torch.contiguous_format)
        x = x.contiguous()
        den.vae = vae.to(memory_format=torch.contiguous_format)
        res["eager_unet_kernels"] = top_kernels(run_unet)
        print(json.dumps(res["eager_ms"]), flush=True)
        save()

    if args.te:
        from streamedit.accel.compile_te import compile_te
        from streamedit.text.fast import FastTextEncoderRunner

        res["te"] = {"eager_ms": round(cuda_ms(lambda: te.encode(config.prompt, te.prepare_images(frames), 8),
                                               reps=5, warmup=1), 2)}
        t1 = time.perf_counter()
        fast = compile_te(FastTextEncoderRunner(models, 8), "reduce-overhead")
        pixels = fast.prepare_images(frames)
        run_te = lambda: fast.encode(config.prompt, pixels, 8)  # noqa: E731
        run_te()
        sync()
        res["te"]["compile_s"] = round(time.perf_counter() - t1, 1)
        res["te"]["fast_ms"] = round(cuda_ms(run_te, reps=30), 2)
        res["te"]["kernels"] = top_kernels(run_te, n=30)
        print("te", {k: v for k, v in res["te"].items() if k != "kernels"}, flush=True)
        save()
        del fast

    import torch._inductor.config as ic

    res["compiled"] = {}
    reference = None
    for name in args.variants.split(","):
        torch._dynamo.reset()
        torch.backends.cudnn.benchmark = name != "base"
        if name in ("cl", "flags"):
            unet.to(memory_format=torch.channels_last)
        if name == "flags":
            ic.conv_1x1_as_mm = True
            ic.coordinate_descent_tuning = True
            ic.epilogue_fusion = False
            ic.coordinate_descent_check_all_directions = True
        t1 = time.perf_counter()
        d = compile_denoiser(Denoiser(models, 1, args.size), "reduce-overhead")
        with torch.no_grad():
            for _ in range(3):
                frame = d.fused(noise, src, embeds)
        sync()
        compile_s = time.perf_counter() - t1
        ms = cuda_ms(lambda: d.fused(noise, src, embeds), reps=30)
        out_u8 = d.fused(noise, src, embeds)[0].clone()  # (frames, latents)
        if reference is None:
            reference = out_u8
        diff = int((out_u8.int() - reference.int()).abs().max())
        entry = {"ms": round(ms, 2), "compile_s": round(compile_s, 1), "max_u8_diff_vs_base": diff}
        if name == "base" or name == args.variants.split(",")[-1]:
            entry["kernels"] = top_kernels(lambda: d.fused(noise, src, embeds), n=30)
        res["compiled"][name] = entry
        print(name, {k: v for k, v in entry.items() if k != "kernels"}, flush=True)
        save()
        del d, frame
    res["total_s"] = round(time.perf_counter() - t0, 1)
    save()
    print("\n| variant | fused ms (B=8) | compile s | max u8 diff |")
    for name, e in res["compiled"].items():
        print(f"| {name} | {e['ms']} | {e['compile_s']} | {e['max_u8_diff_vs_base']} |")
    for k, v in res.get("te", {}).items():
        if k != "kernels":
            print(f"te {k}: {v}")
    for k, v in res.get("eager_ms", {}).items():
        print(f"eager {k}: {v} ms")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
