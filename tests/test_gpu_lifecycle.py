"""Engines built and dropped in one process on a GPU (issue 23): `bench --rows best,reference` died in
`reference` with "unspecified launch failure". Skipped without CUDA.

Cause (graphs.py's module docstring): cuBLAS's per-(handle, stream) workspace was allocated inside the
first captured graph's private pool and then baked into every later graph captured on the same stream;
cudagraph trees (the `reference` row) drop that workspace, the first engine's pool is freed with its
graphs, and the next graph's GEMM runs on unmapped memory. Each check runs in a child process, so a
device fault fails one test with the child's output instead of aborting the whole session.

* test_graph_keeps_its_blas_workspace: the mechanism alone, with StaticGraph and GEMMs that use a workspace;
* test_engines_in_both_orders: `best`-, `reference`- and eager-like engines (bench's own row configs) built
  and closed in both orders in one process, a few batches each, each output equal to the same config's
  output where it ran first (or after an eager engine only). The default model is `random:demo` at 256
  (the published classes at the demo's sizes: the same graphs are captured, in the same order, on the
  same streams as with `random:real`, in a fraction of the compile time); whether a stale workspace is
  actually dereferenced depends on cuBLAS choosing a workspace kernel for the shapes, so
  STREAMEDIT_GPU_LIFECYCLE_MODEL=random:real STREAMEDIT_GPU_LIFECYCLE_SIZE=512 STREAMEDIT_GPU_LIFECYCLE_BATCH=8
  runs it at the bench's own shapes (about 2 minutes of compiling per compiled config).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

SRC = Path(__file__).resolve().parents[1] / "src"


def _child(tmp_path, *args, timeout=900):
    from streamedit.accel import compile_cache

    # precompiled functions in a fresh folder (the first child compiles them, the second loads them); inductor's
    # kernel cache stays the usual one (a cache: the same code either way, minutes of Triton compiles less)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")]),
               STREAMEDIT_CACHE_DIR=str(tmp_path / "cache"),
               TORCHINDUCTOR_CACHE_DIR=str(compile_cache.root() / "inductor"))
    proc = subprocess.run([sys.executable, __file__, *args], env=env, capture_output=True, text=True,
                          timeout=timeout)
    tail = (proc.stdout + proc.stderr)[-4000:]
    assert proc.returncode == 0 and "CHILD OK" in proc.stdout, f"child exited {proc.returncode}:\n{tail}"
    return proc.stdout


def test_graph_keeps_its_blas_workspace(tmp_path):
    out = _child(tmp_path, "graphs", timeout=300)
    assert "sentinels intact" in out


def test_engines_in_both_orders(tmp_path):
    model = os.environ.get("STREAMEDIT_GPU_LIFECYCLE_MODEL", "random:demo")
    size = int(os.environ.get("STREAMEDIT_GPU_LIFECYCLE_SIZE", "256"))
    batch = int(os.environ.get("STREAMEDIT_GPU_LIFECYCLE_BATCH", "4"))
    runs = {"a": ["eager", "best", "reference", "eager"],  # best -> reference: the order that crashed
            "b": ["reference", "best"]}  # reference -> best
    got = {}
    for key, order in runs.items():
        path = tmp_path / f"{key}.npz"
        _child(tmp_path, "engines", json.dumps(dict(model=model, size=size, batch=batch, order=order, out=str(path))))
        with np.load(path) as z:
            got[key] = {name: z[name] for name in z.files}
    a, b = got["a"], got["b"]
    for name, outs in (("eager", a["3_eager"]), ("best", a["1_best"]), ("reference", b["0_reference"])):
        assert min(int(f.max()) - int(f.min()) for f in outs) > 20, f"{name}: outputs without contrast"
    _same(a["3_eager"], a["0_eager"], "eager after best and reference vs eager first")
    _same(b["1_best"], a["1_best"], "best after reference vs best after eager only")
    _same(a["2_reference"], b["0_reference"], "reference after best vs reference first")


def _same(x, y, what):
    """Equal up to the rounding of a different kernel choice: kernels reading freed memory or a foreign
    workspace give garbage or a device fault, not a gray level."""
    assert x.shape == y.shape, what
    diff = np.abs(x.astype(np.int16) - y.astype(np.int16))
    assert diff.max() <= 2 and diff.mean() <= 0.05, f"{what}: max {diff.max()}, mean {diff.mean():.4f}"


# ---------------------------------------------------------------------------------------- children
def _graphs_child() -> None:
    import gc

    from streamedit.accel.graphs import StaticGraph

    dev = torch.device("cuda")
    gen = torch.Generator(device=dev).manual_seed(0)

    def randn(*shape):
        return torch.randn(*shape, device=dev, dtype=torch.bfloat16, generator=gen)

    # GEMMs that run with a workspace: split-K shapes (long K, small M and N), a cuBLASLt bias epilogue,
    # a batched one, and the cond embedder's first layer at the bench's size
    a, b, bias = randn(64, 1 << 18), randn(1 << 18, 64), randn(64)
    x3, y3 = randn(8, 64, 1 << 15), randn(8, 1 << 15, 64)
    p, w, c = randn(131072, 48), randn(48, 448), randn(448)

    def fn(a, b, bias, x3, y3, p, w, c):
        return torch.addmm(bias, a, b), a @ b, torch.bmm(x3, y3), torch.addmm(c, p, w)

    inputs = (a, b, bias, x3, y3, p, w, c)
    first, second = StaticGraph(fn, dev, name="first"), StaticGraph(fn, dev, name="second")
    first(*inputs)  # the first capture of the process that runs a GEMM, on the shared capture stream
    second(*inputs)
    ref = [t.clone() for t in fn(*inputs)]
    del first  # its graph and pool go now (no reference cycle)
    torch._C._cuda_clearCublasWorkspaces()  # what cudagraph trees do at each warm-up and recording
    gc.collect()
    torch.cuda.synchronize()
    torch.cuda.empty_cache()  # the first graph's pool goes back to the driver
    sentinels = [torch.full((8 << 20,), 7.0, device=dev) for _ in range(24)]  # 32 MiB each: reuse freed space
    for _ in range(3):
        outs = second(*inputs)
    torch.cuda.synchronize()
    for got, want in zip(outs, ref):
        torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2 * float(want.abs().max()))
    assert all(bool((s == 7.0).all()) for s in sentinels), "a replay wrote into memory it does not own"
    print("sentinels intact")


def _vivid_decoder(models) -> None:
    """Give the random VAE decoder contrast (it maps every latent to ~black), so outputs can differ."""
    last = [m for m in models.vae.decoder.modules() if isinstance(m, torch.nn.Conv2d)][-1]
    z = torch.randn(4, models.vae.config.latent_channels, 8, 8, generator=torch.Generator().manual_seed(0))
    z = z.to(models.device, models.dtype)
    with torch.no_grad():  # the decoder returns 2 * layers(x) - 1: scale its last conv, then centre it
        last.weight.mul_(0.6 / float(models.vae.decoder(z).float().std()))
        last.bias.sub_(models.vae.decoder(z).float().mean(dim=(0, 2, 3)).div(2).to(last.bias.dtype))


def _engines_child(spec: dict) -> None:
    import gc

    from streamedit import EngineConfig, StreamEngine, load_models
    from streamedit.bench.command import BEST, PAPER_512
    from streamedit.bench.run import bench_frames

    models = load_models(spec["model"], device=spec.get("device", "cuda"), dtype=torch.bfloat16)
    _vivid_decoder(models)
    size, batch = spec["size"], spec["batch"]
    frames = bench_frames(None, size, 6 * batch)
    configs = {"best": BEST, "reference": PAPER_512, "eager": dict(PAPER_512, compile=False)}
    results = {}
    for i, name in enumerate(spec["order"]):
        # refresh every 2 batches: the reference's cond graph replays after its cudagraph trees recorded
        cfg = EngineConfig(prompt="oil painting", batch_size=batch, size=size, seed=0, cond_refresh_every=2,
                           **configs[name])
        if cfg.compile or cfg.vae_compiled:
            torch._dynamo.reset()  # as bench's run_matrix does before each compiled row
        torch.manual_seed(0)  # the same random adapter weights in every engine
        with StreamEngine(models, cfg) as engine:
            results[f"{i}_{name}"] = np.stack(list(engine.run(frames)))
        # whatever the engine left is collected now rather than at an arbitrary later moment
        gc.collect()
        if models.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
        assert not [n for n, m in models.unet.named_modules() if "forward" in vars(m)], "U-Net still patched"
        print(f"{name}: {len(results[f'{i}_{name}'])} frames", flush=True)
    np.savez(spec["out"], **results)


if __name__ == "__main__":
    kind = sys.argv[1]
    if kind == "graphs":
        _graphs_child()
    else:
        _engines_child(json.loads(sys.argv[2]))
    print("CHILD OK", flush=True)
