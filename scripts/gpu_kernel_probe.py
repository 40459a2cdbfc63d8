"""Kernel-level candidates for issue #5's exact path, timed alone at the real shapes (B=8, 512², bf16).

    python scripts/gpu_kernel_probe.py [--out $OUT] [--skip-graphs]

Each probe times the kernels the compiled graphs run today against an exact alternative on the same
inputs, with its max abs difference against an fp32 reference, so a change is made only where it pays:

  vit_mlp     the ViT MLP's fc1 + tanh-GELU (24 per batch): bias GEMM + elementwise GELU, against
              cuBLASLt's fused GELU epilogue (``torch._addmm_activation``)
  llm_attn    the LLM's attention over [64 cached prefix keys ; 293 suffix tokens] (28 per batch):
              repeat_kv + boolean mask (what transformers' sdpa does with a mask), against flash
              attention's own lower-right causal alignment (with and without GQA expansion)
  vit_attn    the ViT's attention (24 per batch) per SDPA backend
  conv        TAESD's 64-channel 3x3 conv + bias + ReLU at 512² (channels_last), inductor-compiled
              against cuDNN's fused ``cudnn_convolution_relu``; the final 64->3 conv
  group_norm  the U-Net's GroupNorm + SiLU over channels_last (8, C, 64, 128) per inductor option
  graphs      the fast TE and the main function (U-Net + adapter + decode) and VAE encode as the engine
              compiles them (kernel substitutions on): every kernel, by class, the generated source of
              their slowest Triton kernels, and their outputs against the substitutions off (eager);
              ``--variants base,flags``: flags = + inductor coordinate-descent tuning, tiled reductions

Writes $OUT/kernel-probe.json (+ $OUT/triton-sources.txt). Diagnostics: speed claims come from the bench.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import re
import time
from pathlib import Path

import torch
import torch.nn.functional as F

DEV, DT = "cuda", torch.bfloat16


def ms(fn, reps: int = 50, warmup: int = 5) -> float:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    torch.cuda.synchronize()
    return round(start.elapsed_time(end) / reps, 4)


def diff(a, ref) -> float:
    return float((a.float() - ref.float()).abs().max())


def probe_vit_mlp() -> dict:
    x = torch.randn(8 * 1024, 1024, device=DEV, dtype=DT)
    w = torch.randn(4096, 1024, device=DEV, dtype=DT) * 0.03
    b = torch.randn(4096, device=DEV, dtype=DT) * 0.1
    ref = F.gelu(F.linear(x.float(), w.float(), b.float()), approximate="tanh")
    sep = torch.compile(lambda x: F.gelu(F.linear(x, w, b), approximate="tanh"))
    fused = lambda x: torch._addmm_activation(b, x, w.t(), use_gelu=True)  # noqa: E731
    return {"linear_ms": ms(lambda: F.linear(x, w, b)), "compiled_linear_gelu_ms": ms(lambda: sep(x)),
            "addmm_gelu_epilogue_ms": ms(lambda: fused(x)),
            "diff_compiled": diff(sep(x), ref), "diff_epilogue": diff(fused(x), ref)}


def probe_llm_attn() -> dict:
    b, h, hk, lq, pre, d = 8, 16, 8, 293, 64, 128
    lk = lq + pre
    q = torch.randn(b, h, lq, d, device=DEV, dtype=DT)
    k, v = (torch.randn(b, hk, lk, d, device=DEV, dtype=DT) for _ in range(2))
    mask = torch.arange(lk, device=DEV)[None] <= torch.arange(lq, device=DEV)[:, None] + pre  # (lq, lk)
    scale = d ** -0.5
    rep = lambda t: t.repeat_interleave(h // hk, dim=1)  # noqa: E731
    ref = F.scaled_dot_product_attention(q.float(), rep(k).float(), rep(v).float(), attn_mask=mask, scale=scale)
    out = {}

    def masked():
        return F.scaled_dot_product_attention(q, rep(k), rep(v), attn_mask=mask[None, None], scale=scale)

    def flash_gqa():
        return torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, is_causal=True, scale=scale)[0]

    def flash_rep():
        return torch.ops.aten._scaled_dot_product_flash_attention(q, rep(k), rep(v), 0.0, is_causal=True,
                                                                  scale=scale)[0]

    def efficient():
        return torch.ops.aten._efficient_attention_forward(
            q.transpose(1, 2), rep(k).transpose(1, 2), rep(v).transpose(1, 2), None, None, None, None, None, 0.0,
            2, False, scale=scale)[0].transpose(1, 2)

    for name, fn in (("repeat_kv_mask_default", masked), ("flash_lower_right_gqa", flash_gqa),
                     ("flash_lower_right_repeat", flash_rep), ("efficient_lower_right", efficient)):
        try:
            out[name + "_ms"] = ms(fn)
            out[name + "_diff"] = diff(fn(), ref)
        except Exception as e:  # noqa: BLE001 - report, go on
            out[name] = f"error: {type(e).__name__}: {str(e)[:200]}"
    from torch.nn.attention import SDPBackend, sdpa_kernel
    for backend in ("CUDNN_ATTENTION", "EFFICIENT_ATTENTION"):
        try:
            with sdpa_kernel(getattr(SDPBackend, backend)):
                out[f"repeat_kv_mask_{backend}_ms"] = ms(masked)
        except Exception as e:  # noqa: BLE001
            out[f"repeat_kv_mask_{backend}"] = f"error: {type(e).__name__}: {str(e)[:200]}"
    return out


def probe_vit_attn() -> dict:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    q, k, v = (torch.randn(8, 16, 1024, 64, device=DEV, dtype=DT) for _ in range(3))
    out = {}
    for backend in ("CUDNN_ATTENTION", "FLASH_ATTENTION", "EFFICIENT_ATTENTION"):
        try:
            with sdpa_kernel(getattr(SDPBackend, backend)):
                out[backend + "_ms"] = ms(lambda: F.scaled_dot_product_attention(q, k, v))
        except Exception as e:  # noqa: BLE001
            out[backend] = f"error: {type(e).__name__}: {str(e)[:200]}"
    return out


def probe_conv() -> dict:
    cl = torch.channels_last
    x = torch.randn(8, 64, 512, 512, device=DEV, dtype=DT).contiguous(memory_format=cl)
    w = (torch.randn(64, 64, 3, 3, device=DEV, dtype=DT) * 0.05).contiguous(memory_format=cl)
    b = torch.randn(64, device=DEV, dtype=DT) * 0.1
    w3 = (torch.randn(3, 64, 3, 3, device=DEV, dtype=DT) * 0.05).contiguous(memory_format=cl)
    b3 = torch.randn(3, device=DEV, dtype=DT) * 0.1
    ref = F.relu(F.conv2d(x.float(), w.float(), b.float(), padding=1))
    comp = torch.compile(lambda x: F.relu(F.conv2d(x, w, b, padding=1)))
    fused = lambda x: torch.cudnn_convolution_relu(x, w, b, (1, 1), (1, 1), (1, 1), 1)  # noqa: E731
    skip = x.clone()
    comp_add = torch.compile(lambda x, s: F.relu(F.conv2d(x, w, b, padding=1) + s))
    fused_add = lambda x, s: torch.cudnn_convolution_add_relu(x, w, s, 1.0, b, (1, 1), (1, 1), (1, 1), 1)  # noqa
    out = {"conv_only_ms": ms(lambda: F.conv2d(x, w, b, padding=1)), "compiled_conv_relu_ms": ms(lambda: comp(x)),
           "cudnn_conv_relu_ms": ms(lambda: fused(x)), "compiled_conv_add_relu_ms": ms(lambda: comp_add(x, skip)),
           "cudnn_conv_add_relu_ms": ms(lambda: fused_add(x, skip)),
           "diff_compiled": diff(comp(x), ref), "diff_cudnn": diff(fused(x), ref)}
    out["final_conv_64_3_ms"] = ms(lambda: F.conv2d(x, w3, b3, padding=1))
    w16 = F.pad(w3, (0, 0, 0, 0, 0, 0, 0, 13)).contiguous(memory_format=cl)
    out["final_conv_padded_16_ms"] = ms(lambda: F.conv2d(x, w16, None, padding=1))
    up = torch.randn(8, 64, 256, 256, device=DEV, dtype=DT).contiguous(memory_format=cl)
    comp_up = torch.compile(lambda u: F.conv2d(F.interpolate(u, scale_factor=2.0, mode="nearest"), w, None, padding=1))
    out["compiled_upsample_conv_ms"] = ms(lambda: comp_up(up))
    return out


def probe_group_norm() -> dict:
    """GroupNorm(32) + SiLU (with and without a per-channel add, as in a resnet's norm2) over channels_last
    U-Net activations, per inductor option: the default split reduction, none, tiled, coordinate descent."""
    import torch._inductor.config as ic

    def with_add(x, t, w, b):
        return F.silu(F.group_norm(x + t[:, :, None, None], 32, w, b, 1e-5))

    def plain(x, w, b):
        return F.silu(F.group_norm(x, 32, w, b, 1e-5))

    out = {}
    for c in (512, 256):
        x = torch.randn(8, c, 64, 128, device=DEV, dtype=DT).contiguous(memory_format=torch.channels_last)
        t, w, b = (torch.randn(*s, device=DEV, dtype=DT) for s in ((8, c), (c,), (c,)))
        ref = with_add(x.float(), t.float(), w.float(), b.float())
        for name, flags in (("default", {}), ("tile_reductions", {"triton.tile_reductions": True}),
                            ("no_split", {"split_reductions": False}), ("coordinate_descent", {
                                "coordinate_descent_tuning": True})):
            torch._dynamo.reset()
            with ic.patch(flags):
                fa, fp = torch.compile(with_add), torch.compile(plain)
                out[f"{c}_{name}"] = {"add_ms": ms(lambda: fa(x, t, w, b)), "plain_ms": ms(lambda: fp(x, w, b)),
                                      "diff": diff(fa(x, t, w, b), ref)}
    return out


def kernel_table(fn, reps: int = 3) -> list[dict]:
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            fn()
        torch.cuda.synchronize()
    rows = [{"kernel": e.key[:150], "ms": round(e.device_time_total / 1000 / reps, 4), "calls": e.count // reps}
            for e in prof.key_averages() if e.device_time_total > 0]
    return sorted(rows, key=lambda r: -r["ms"])


def classify(name: str) -> str:
    n = name.lower()
    for cls, keys in (("attention", ("sdpa", "flash", "fmha", "attention")), ("triton", ("triton_",)),
                      ("conv", ("fprop", "conv", "implicit")), ("gemm", ("nvjet", "gemm", "cutlass", "xmma"))):
        if any(k in n for k in keys):
            return cls
    return "other"


def summarize(rows: list[dict]) -> dict:
    by: dict[str, float] = {}
    for r in rows:
        by[classify(r["kernel"])] = round(by.get(classify(r["kernel"]), 0.0) + r["ms"], 3)
    return {"total_ms": round(sum(r["ms"] for r in rows), 3), "by_class": by, "kernels": rows}


def triton_sources(rows: list[dict], cache: str, n: int = 8) -> str:
    names = [r["kernel"] for r in rows if r["kernel"].startswith("triton_")][:n]
    files = glob.glob(os.path.join(cache, "**", "*.py"), recursive=True)
    out = []
    for name in names:
        for path in files:
            text = Path(path).read_text(errors="ignore")
            m = re.search(rf"def {re.escape(name)}\(.*?(?=\n''', device_str|\Z)", text, re.S)
            if m:
                out.append(f"##### {name}\n{text[max(0, m.start() - 1500):m.start()]}\n{m.group(0)[:4000]}\n")
                break
    return "\n".join(out)


def agreement(a: torch.Tensor, b: torch.Tensor) -> dict:
    a, b = a.float().flatten(1), b.float().flatten(1)
    cos = F.cosine_similarity(a, b, dim=1)
    return {"max_abs": round(float((a - b).abs().max()), 5), "cos_min": round(float(cos.min()), 6)}


def probe_graphs(out: Path, res: dict, save, variants: list[str]) -> None:
    """The fast TE and the main/encode functions as the engine compiles them, with the kernel substitutions
    (streamedit.accel.kernels) on, each output against the same code with them off (eager)."""
    import numpy as np
    import torch._inductor.config as ic

    from streamedit.accel.compile_main import compile_denoiser
    from streamedit.accel.compile_te import compile_te
    from streamedit.config import EngineConfig
    from streamedit.diffusion.denoiser import Denoiser
    from streamedit.models.loading import load_models
    from streamedit.temporal.attach import attach_adapter
    from streamedit.text.exact import TextEncoderRunner
    from streamedit.text.fast import FastTextEncoderRunner

    models = load_models("random:real", device=DEV, dtype=DT)
    config = EngineConfig(prompt="oil painting", lllite="random", hooks="down", compile=True, size=512)
    attach_adapter(models, config.temporal, config.size)
    rng = np.random.default_rng(0)
    host = [rng.integers(0, 256, (512, 512, 3), dtype=np.uint8) for _ in range(8)]
    frames = torch.from_numpy(np.stack(host)).to(DEV)
    cache = os.environ["TORCHINDUCTOR_CACHE_DIR"]
    sources = []
    lib = TextEncoderRunner(models)
    ref = lib.encode(config.prompt, lib.prepare_images(host), 8)
    plain = FastTextEncoderRunner(models, 8, fused_kernels=False).encode(config.prompt, frames, 8)
    t0 = time.perf_counter()
    fast = FastTextEncoderRunner(models, 8)
    fused_eager = fast.encode(config.prompt, frames, 8)
    compile_te(fast, "reduce-overhead")
    embeds = fast.encode(config.prompt, frames, 8)
    torch.cuda.synchronize()
    te = summarize(kernel_table(lambda: fast.encode(config.prompt, frames, 8)))
    res["te"] = {"compile_s": round(time.perf_counter() - t0, 1),
                 "ms": ms(lambda: fast.encode(config.prompt, frames, 8), reps=20),
                 "plain_vs_library": agreement(plain, ref), "fused_vs_plain": agreement(fused_eager, plain),
                 "fused_compiled_vs_library": agreement(embeds, ref), **te}
    sources.append("######## TE\n" + triton_sources(te["kernels"], cache))
    print("te", {k: v for k, v in res["te"].items() if k != "kernels"}, flush=True)
    save()
    del fast, lib
    src = Denoiser(models, 1, 512).encode(frames)
    noise = torch.randn_like(src)
    eager_out = Denoiser(models, 1, 512).generate(noise, src, embeds)[0]  # library VAE, NCHW, eager
    for variant in variants:
        torch._dynamo.reset()
        if variant == "flags":
            ic.coordinate_descent_tuning = True
            ic.triton.tile_reductions = True
        t0 = time.perf_counter()
        den = compile_denoiser(Denoiser(models, 1, 512), "reduce-overhead")
        enc = den.encode(frames)
        out_u8 = den.fused(noise, src, embeds)[0]  # (frames, latents)
        torch.cuda.synchronize()
        entry = {"compile_s": round(time.perf_counter() - t0, 1),
                 "u8_max_diff_vs_eager": int((out_u8.int() - eager_out.int()).abs().max()),
                 "u8_mean_diff_vs_eager": round(float((out_u8.float() - eager_out.float()).abs().mean()), 4),
                 "encode_vs_eager": agreement(enc, src)}
        for name, fn in (("main", lambda: den.fused(noise, src, embeds)), ("encode", lambda: den.encode(frames))):
            table = summarize(kernel_table(fn))
            entry[name] = {"ms": ms(fn, reps=20), **table}
            if variant == variants[0]:
                sources.append(f"######## {name}\n" + triton_sources(table["kernels"], cache))
        res[f"graphs_{variant}"] = entry
        print(variant, {k: (v if not isinstance(v, dict) or "kernels" not in v else
                            {"ms": v["ms"], "by_class": v["by_class"]}) for k, v in entry.items()}, flush=True)
        save()
        del den
    (out / "triton-sources.txt").write_text("\n".join(sources))


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "out"))
    ap.add_argument("--skip-graphs", action="store_true")
    ap.add_argument("--skip-probes", action="store_true", help="only the compiled graphs")
    ap.add_argument("--variants", default="base,flags",
                    help="main/encode compiles: base (as the engine), flags (+ coordinate descent, tiled reductions)")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", "/tmp/inductor-probe")
    res: dict = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}

    def save():
        (out / "kernel-probe.json").write_text(json.dumps(res, indent=1))

    with torch.no_grad():
        probes = () if args.skip_probes else (("vit_mlp", probe_vit_mlp), ("llm_attn", probe_llm_attn),
                                              ("vit_attn", probe_vit_attn), ("conv", probe_conv),
                                              ("group_norm", probe_group_norm))
        for name, fn in probes:
            try:
                res[name] = fn()
            except Exception as e:  # noqa: BLE001 - one failed probe must not cost the others
                res[name] = f"error: {type(e).__name__}: {str(e)[:300]}"
            print(name, res[name], flush=True)
            save()
        if not args.skip_graphs:
            probe_graphs(out, res, save, args.variants.split(","))
    print("\n| probe | ms |")
    for name in ("vit_mlp", "llm_attn", "vit_attn", "conv", "group_norm"):
        for k, v in (res[name].items() if isinstance(res.get(name), dict) else []):
            print(f"| {name}.{k} | {v} |")
    if "te" in res:
        print(f"| te | {res['te']['ms']} | {res['te']['by_class']} |")
    for variant in args.variants.split(","):
        for name in ("main", "encode"):
            if f"graphs_{variant}" in res:
                e = res[f"graphs_{variant}"][name]
                print(f"| {variant} {name} | {e['ms']} | {e['by_class']} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
