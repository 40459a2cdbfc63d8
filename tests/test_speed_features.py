"""Speed features on CPU (random:tiny): compiled main/side functions against eager, the static graph
helper, the similarity filter, FP8 Linears, the compile cache and the low-latency schedule."""

import copy
import dataclasses
import json
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from torch import nn
from torch._dynamo.testing import CompileCounterWithBackend

from streamedit import EngineConfig, StreameditError, StreamEngine
from streamedit.accel.compile_main import compile_denoiser, warm_main
from streamedit.accel.graphs import StaticGraph
from streamedit.diffusion.denoiser import Denoiser
from streamedit.temporal.adapter import LLLiteAdapter, apply_lllite, remove_lllite


@pytest.fixture(autouse=True, scope="module")
def private_compile_cache(tmp_path_factory):
    """Engines that compile point inductor at STREAMEDIT_CACHE_DIR: keep it out of the user's home."""
    mp = pytest.MonkeyPatch()
    mp.setenv("STREAMEDIT_CACHE_DIR", str(tmp_path_factory.mktemp("compile-cache")))
    mp.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    yield
    mp.undo()


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def scene(t, size=64):
    yy, xx = np.mgrid[0:size, 0:size] * (64.0 / size)
    r = 127 + 120 * np.sin((xx + 3 * t) / 7.0)
    g = 127 + 120 * np.cos((yy - 2 * t) / 9.0)
    b = 255.0 * ((xx + yy + 5 * t) % 64) / 64
    return np.stack([r, g, b], -1).astype(np.uint8)


def run(models, frames, **kw):
    cfg = dict(prompt="oil painting", batch_size=2, size=64, seed=3)
    cfg.update(kw)
    engine = StreamEngine(models, EngineConfig(**cfg))
    try:
        return list(engine.run(frames)), engine
    finally:
        engine.close()


def max_diff(a, b):
    return max(int(np.abs(x.astype(int) - y).max()) for x, y in zip(a, b))


@pytest.fixture(scope="module")
def vivid_models(tiny_models):
    """random:tiny with a decoder of usable contrast: the random one maps every latent to ~black
    (-1.05 ± 0.07 before the clamp), which would hide any difference between two outputs."""
    vae = copy.deepcopy(tiny_models.vae)
    last = [m for m in vae.decoder.modules() if isinstance(m, nn.Conv2d)][-1]
    with torch.no_grad():
        last.weight.mul_(40)
        raw = vae.decoder(torch.randn(4, 4, 8, 8, generator=torch.Generator().manual_seed(0)))
        last.bias.sub_(raw.mean(dim=(0, 2, 3)))
    return dataclasses.replace(tiny_models, vae=vae, extras={})


def random_adapter(models, scale=0.3):
    adapter = LLLiteAdapter.for_unet(models.unet, hooks="down", cond_size=64)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _, m in adapter.items():  # non-zero `up`: the cond image must change the output
            m.up[0].weight.copy_(torch.randn(m.up[0].weight.shape, generator=gen) * scale)
    return adapter


# ---- 1. compiled VAE / fused main graph ----------------------------------------------------------
def test_static_graph_buffers_outputs_and_recaptures():
    calls = []

    def fn(x, y):
        calls.append(1)
        return x * 2 + y

    g = StaticGraph(fn, "cpu")
    a, b = torch.arange(6.0).view(2, 3), torch.ones(2, 3)
    out1 = g(a, b)
    assert torch.equal(out1, a * 2 + b) and g.captures == 1
    out2 = g(a + 1, b)
    assert torch.equal(out2, (a + 1) * 2 + b) and g.captures == 1
    assert g._inputs[0] is not a and torch.equal(g._inputs[0], a + 1)  # inputs copied into static buffers
    g(torch.zeros(3, 3), torch.zeros(3, 3))  # new shape: new capture
    g(torch.zeros(3, 3), torch.zeros(3, 3), key=("prompt", 2))  # same shape, new baked-in constant
    assert g.captures == 3 and len(calls) == 4


def test_warm_main_loads_then_captures_on_a_worker(tiny_models, tmp_path, monkeypatch):
    """Warm start: the saved main function is loaded on the caller's thread and its graph captured on a
    worker; the batch that follows replays that capture (no second one) and gives the cold path's output."""
    from streamedit.accel import compile_cache

    monkeypatch.setenv("STREAMEDIT_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(compile_cache, "STATS", dict.fromkeys(compile_cache.STATS, 0))
    gen = torch.Generator().manual_seed(0)
    inputs = torch.randn(2, 4, 8, 8, generator=gen), torch.randn(2, 4, 8, 8, generator=gen), \
        torch.randn(2, 300, 64, generator=gen)

    def graphed_denoiser():
        den = compile_denoiser(Denoiser(tiny_models, 1, 64), None, backend="aot_eager", cache_key="k")
        den.fused = StaticGraph(den.fused, "cpu", name="main")  # what compile_denoiser makes on CUDA
        return den

    torch._dynamo.reset()
    cold = graphed_denoiser()
    assert warm_main(cold, 2, (300, 64)) is None  # compiled here: nothing to overlap
    ref = [t.clone() for t in cold.fused(*inputs)]  # (frames, latents)
    warm = graphed_denoiser()
    future = warm_main(warm, 2, (300, 64))
    assert future is not None
    future.result()
    assert warm.fused.fn.sources == ["loaded"] and warm.fused.captures == 1
    assert all(torch.equal(a, b) for a, b in zip(warm.fused(*inputs), ref)) and warm.fused.captures == 1
    torch._dynamo.reset()


def test_fused_generate_sees_lllite_cond_updates(tiny_models):
    """The compiled U-Net (+ decode) function reads the adapter's in-place cond buffers at every call.

    The tiny U-Net barely reacts to the adapter (latents move by ~0.006), far below what its random
    VAE shows in 8 bits, so the fused function's latents output is compared.
    """
    models = tiny_models
    adapter = random_adapter(models)
    apply_lllite(models.unet, adapter)
    adapter.allocate(2, 64, 64)
    try:
        eager = Denoiser(models, 2, 64)
        compiled = Denoiser(models, 2, 64)
        counter = CompileCounterWithBackend("aot_eager")
        compile_denoiser(compiled, "reduce-overhead", backend=counter)
        assert compiled.fused is not None and compiled.vae is not models.vae
        gen = torch.Generator().manual_seed(0)
        noise, source = torch.randn(2, 4, 8, 8, generator=gen), torch.randn(2, 4, 8, 8, generator=gen)
        embeds = torch.randn(2, 300, 64, generator=gen)
        outs = []
        for cond in (scene(0), scene(9)[::-1].copy(), scene(0)):
            adapter.set_cond_image(torch.from_numpy(np.stack([cond, cond])).permute(0, 3, 1, 2))
            outs.append((eager.denoise(noise, source, embeds), compiled.fused(noise, source, embeds)[1]))
        for ref, got in outs:
            assert (ref - got).abs().max() < 1e-5
        assert (outs[0][0] - outs[1][0]).abs().max() > 1e-3  # the cond change moves the latents ...
        assert (outs[0][1] - outs[2][1]).abs().max() < 1e-6  # ... and back
        assert counter.frame_count == 1  # one graph (a graph break would add one), never recompiled
    finally:
        remove_lllite(models.unet)


def test_compiled_engine_matches_eager(vivid_models):
    models, frames = vivid_models, [scene(t) for t in range(6)]
    adapter = random_adapter(models)
    kw = dict(lllite=adapter, cond_refresh_every=1, fixed_noise=False)
    ref, _ = run(models, frames, **kw)
    assert max(int(f.max()) - int(f.min()) for f in ref) > 100  # outputs with contrast to compare
    counter = CompileCounterWithBackend("aot_eager")
    got, engine = run(models, frames, compile=True, compile_backend=counter, **kw)
    assert engine.denoiser.fused is not None
    assert max_diff(ref, got) <= 1
    assert counter.frame_count == 2  # fused U-Net + decode, VAE encode: no graph break, no recompile
    unfused, engine = run(models, frames, compile=True, compile_vae=False, compile_backend="aot_eager", **kw)
    assert engine.denoiser.fused is None and max_diff(ref, unfused) <= 1  # the previous recipe still works


def test_compiled_engine_matches_eager_at_non_square(vivid_models):
    """64 x 96 working frames through the compiled graphs (fused main graph, VAE encode, fast TE, the
    staggered cond refresh in the paper's flow convention) against the eager engine."""
    models = vivid_models
    frames = [np.ascontiguousarray(np.concatenate([scene(t), scene(t + 9)], axis=1)[:, :96]) for t in range(6)]
    adapter = LLLiteAdapter.for_unet(models.unet, hooks="down", cond_size=64, flow="forward")
    adapter.load_state_dict(random_adapter(models).state_dict())
    kw = dict(lllite=adapter, cond_refresh_every=2, cond_stagger=True, fixed_noise=False, size=96, te_fast=True)
    ref, engine = run(models, frames, **kw)
    assert engine.shape == (64, 96) and ref[0].shape == (64, 96, 3)
    assert max(int(f.max()) - int(f.min()) for f in ref) > 100
    got, engine = run(models, frames, compile=True, compile_backend="aot_eager", **kw)
    assert engine.denoiser.fused is not None and engine.temporal.convention == "forward"
    assert max_diff(ref, got) <= 1


def test_compiled_vae_inductor_channels_last(vivid_models):
    """Inductor on CPU (no CUDA graphs): compiled VAE encode + decode against the eager VAE."""
    models, frames = vivid_models, [scene(t) for t in range(4)]
    ref, _ = run(models, frames)
    got, engine = run(models, frames, compile_vae=True)
    assert max_diff(ref, got) <= 1
    vae = engine.denoiser.vae
    assert vae is not models.vae  # a channels_last copy; the shared (eager) VAE is untouched
    conv = next(m for m in vae.modules() if isinstance(m, nn.Conv2d) and m.weight.shape[-1] > 1)
    shared = next(m for m in models.vae.modules() if isinstance(m, nn.Conv2d) and m.weight.shape[-1] > 1)
    assert conv.weight.is_contiguous(memory_format=torch.channels_last) and shared.weight.is_contiguous()
    assert not shared.weight.is_contiguous(memory_format=torch.channels_last)


# ---- 2. similarity filter --------------------------------------------------------------------------
def test_static_clip_skips_everything_after_the_first_frame(tiny_models):
    frames = [scene(0)] * 10  # B=2: 5 batches
    outs, engine = run(tiny_models, frames, skip_similar=0.5, fixed_noise=False)
    assert all(np.array_equal(o, outs[0]) for o in outs)  # fresh noise per frame: equal only if re-emitted
    assert engine.stats.skipped_frames == 9 and engine.stats.skipped_batches == 4
    assert engine.stats.te_calls == 1
    assert [e.skipped for e in engine.batch_log] == [1, 2, 2, 2, 2]
    assert [e.te for e in engine.batch_log] == ["computed"] + ["skipped"] * 4
    off, engine = run(tiny_models, frames, fixed_noise=False)
    assert engine.stats.skipped_frames == 0 and not np.array_equal(off[0], off[1])


def test_moving_clip_is_not_skipped_and_filter_off_is_default(tiny_models):
    frames = [scene(t) for t in range(7)]
    on, engine = run(tiny_models, frames, skip_similar=1.0, fixed_noise=False)
    assert engine.stats.skipped_frames == 0 and engine.stats.skipped_batches == 0
    assert EngineConfig(prompt="x").skip_similar is None
    off, engine = run(tiny_models, frames, fixed_noise=False)
    assert engine._similar is None and all(np.array_equal(a, b) for a, b in zip(on, off))


@pytest.mark.parametrize("pipeline", [True, False])
def test_held_frames_re_emit_their_first_output(tiny_models, pipeline):
    keys = [0, 0, 0, 5, 5, 9, 9, 9, 9, 9, 9, 2, 2, 2, 2, 2]  # held frames crossing batch borders (B=4)
    outs, engine = run(tiny_models, [scene(k) for k in keys], batch_size=4, skip_similar=0.5, fixed_noise=False,
                       pipeline=pipeline)
    for i, k in enumerate(keys):
        first = keys.index(k)
        assert np.array_equal(outs[i], outs[first]), i
    assert not np.array_equal(outs[0], outs[3]) and not np.array_equal(outs[5], outs[11])
    assert engine.stats.skipped_frames == len(keys) - 4  # computed: frames 0, 3, 5 and 11
    assert engine.stats.skipped_batches == 1  # frames 12-15: nothing launched
    assert [e.skipped for e in engine.batch_log] == [2, 3, 3, 4]


def test_prompt_change_recomputes_a_static_scene(tiny_models):
    engine = StreamEngine(tiny_models, EngineConfig(prompt="oil painting", batch_size=2, size=64, seed=3,
                                                    skip_similar=0.5, te_refresh_every=100))
    outs = []
    try:
        for i, out in enumerate(engine.run([scene(0)] * 12)):
            outs.append(out)
            if i == 3:
                engine.set_prompt("watercolor")
    finally:
        engine.close()
    log = engine.batch_log
    changed = next(i for i, e in enumerate(log) if e.prompt == "watercolor")
    assert log[changed].te == "computed" and log[changed].skipped == 1  # its first frame re-stylized
    assert all(e.te == "skipped" for e in log[changed + 1:])
    first_new = 2 * changed
    assert not np.array_equal(outs[first_new], outs[0])
    assert all(np.array_equal(o, outs[first_new]) for o in outs[first_new:])
    assert engine.stats.te_calls == 2


def test_bench_reports_skip_counters(tmp_path):
    import streamedit.bench.command as bench
    from streamedit.cli.group import _Group

    out = tmp_path / "b.jsonl"
    group = _Group("streamedit", commands={"bench": bench.bench_command})
    res = CliRunner().invoke(group, ["bench", "--model", "random:tiny", "--device", "cpu", "--size", "64",
                                     "--batch", "2", "--frames", "16", "--source-fps", "0", "--hold", "6",
                                     "--skip-similar", "0.5", "--set", "te_refresh_every=100", "--json", str(out)],
                             catch_exceptions=False)
    assert res.exit_code == 0, res.output
    (row,) = [json.loads(line) for line in out.read_text().splitlines()]
    # counted batches 1-7 (frames 2-15): held frames 0x6, 1x6, 2x4 -> computed frames 6 and 12
    assert row["skipped_frames"] == 12 and row["skipped_batches"] == 5
    assert row["computed_fraction"] == pytest.approx(2 / 7)
    assert "skipped fr" in res.output and row["config"]["skip_similar"] == 0.5


# ---- 3. FP8 ----------------------------------------------------------------------------------------------
def test_fp8_emulation_is_scaled_mm():
    from streamedit.text.fp8 import fp8_matmul, quantize

    gen = torch.Generator().manual_seed(0)
    x, w = torch.randn(40, 64, generator=gen), torch.randn(48, 64, generator=gen)
    for rowwise, dtype in ((True, torch.bfloat16), (False, torch.float32)):
        xq, xs = quantize(x, rowwise)
        wq, ws = quantize(w, rowwise)
        ws = ws.t().contiguous() if rowwise else ws
        ours = fp8_matmul(xq, wq, xs, ws, dtype)
        ref = torch._scaled_mm(xq, wq.t(), scale_a=xs, scale_b=ws, out_dtype=dtype)
        assert ours.dtype == ref.dtype == dtype
        torch.testing.assert_close(ours.float(), ref.float(), rtol=1e-2, atol=1e-2)
        assert ((ours.float() - x @ w.t()).norm() / (x @ w.t()).norm()) < 0.05  # and close to the real product


def test_fp8_linear_scales():
    from streamedit.text.fp8 import Fp8Linear

    torch.manual_seed(0)
    lin = nn.Linear(64, 32)
    x = torch.randn(5, 7, 64)
    x[0, 0] *= 1e5  # one outlier token, beyond e4m3's dynamic range (448 / 2**-9) relative to the others
    ref = lin(x)
    rowwise, tensorwise = Fp8Linear(lin, rowwise=True), Fp8Linear(lin, rowwise=False)
    assert rowwise.w_scale.shape == (1, 32) and tensorwise.w_scale.dim() == 0 and rowwise.weight.dtype == torch.float8_e4m3fn
    err = {name: ((m(x) - ref)[1:].norm() / ref[1:].norm()).item() for name, m in (("row", rowwise), ("tensor", tensorwise))}
    assert err["row"] < 0.05 and err["tensor"] > 0.2  # per-token scales keep the outlier from crushing the rest
    big = rowwise(x * 1000)  # activation scales are dynamic: no overflow (e4m3 max 448)
    assert torch.isfinite(big).all() and ((big - rowwise.bias) / 1000 - (rowwise(x) - rowwise.bias)).abs().max() < 0.1


def test_fp8_replaces_only_aligned_linears_and_agrees(tiny_models):
    from streamedit.text.fast import te_fp8_agreement
    from streamedit.text.fp8 import Fp8Linear, with_fp8_linears

    tree = with_fp8_linears(nn.Sequential(nn.Linear(32, 48), nn.ReLU(), nn.Linear(48, 32), nn.Linear(32, 24)))
    assert [type(m).__name__ for m in tree] == ["Fp8Linear", "ReLU", "Fp8Linear", "Linear"]
    frames = torch.from_numpy(np.stack([scene(t, 512) for t in (0, 7)]))
    agree = te_fp8_agreement(tiny_models, frames, "oil painting")
    assert 0.99 < agree["cosine_mean"] <= 1.0 and agree["cosine_min"] > 0.9 and 0 < agree["rel_l2"] < 0.1
    small = torch.from_numpy(np.stack([scene(t, 256) for t in (0, 7)]))  # the paper's view: real tokens only
    agree = te_fp8_agreement(tiny_models, small, "oil painting", te_size=256)
    assert 0.99 < agree["cosine_mean"] <= 1.0 and agree["cosine_min"] > 0.9 and 0 < agree["rel_l2"] < 0.1
    assert not any(isinstance(m, Fp8Linear) for m in tiny_models.text_encoder.modules())


def test_te_fp8_needs_te_fast_and_cuda(tiny_models, tmp_path):
    with pytest.raises(StreameditError, match="needs --te-fast"):
        StreamEngine(tiny_models, EngineConfig(prompt="x", size=64, te_fp8=True))
    with pytest.raises(StreameditError, match="CUDA GPU with FP8"):
        StreamEngine(tiny_models, EngineConfig(prompt="x", size=64, te_fp8=True, te_fast=True))
    from streamedit.cli.group import cli
    from streamedit.video.clips import make_test_clip

    src = make_test_clip(tmp_path / "in.mp4", frames=2, width=64, height=64)
    for extra, msg in ((["--te-fp8"], "needs --te-fast"), (["--te-fp8", "--te-fast"], "CUDA GPU")):
        res = CliRunner().invoke(cli, ["stylize", str(src), "-o", str(tmp_path / "o.mp4"), "-p", "x", "--model",
                                       "random:tiny", "--device", "cpu", *extra])
        assert res.exit_code == 2 and msg in res.stderr and res.stderr.count("error:") == 1


# ---- 4. compile cache -------------------------------------------------------------------------------
def test_cache_dir_and_key(tiny_models, monkeypatch, tmp_path):
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    from streamedit.accel import compile_cache

    monkeypatch.setenv("STREAMEDIT_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", default_cache_dir())  # what importing torch._dynamo sets
    assert compile_cache.setup() == str(tmp_path / "inductor")
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "mine"))  # the user's choice wins
    assert compile_cache.setup() == str(tmp_path / "mine")
    key = compile_cache.artifact_key(tiny_models, EngineConfig(prompt="a"))
    assert key == compile_cache.artifact_key(tiny_models, EngineConfig(prompt="another prompt"))
    assert key != compile_cache.artifact_key(tiny_models, EngineConfig(prompt="a", batch_size=4))


def test_startup_overrides_change_only_their_launches(monkeypatch):
    """An A/B of warm starts on one cache: each launch gets the config plus its own overrides."""
    import streamedit.bench.startup as startup

    seen = {}

    def fake_launch(spec, name, root, env, python_args=()):
        seen[name] = spec["config"]
        np.save(Path(root) / f"{name}.npy", np.zeros((2, 2, 3), np.uint8))
        return {"first_frame_s": 1.0}

    monkeypatch.setattr(startup, "_launch", fake_launch)
    out = startup.measure_startup("random:tiny", None, "cpu", "float32", EngineConfig(prompt="x"),
                                  launches=("cold", "b", "warm"), overrides={"b": {"warm_on_worker": False}})
    assert [seen[n]["warm_on_worker"] for n in ("cold", "b", "warm")] == [True, False, True]
    assert seen["cold"]["prompt"] == seen["b"]["prompt"] == "x" and out["b_s"] == 1.0
    assert out["first_frame_max_diff"] == 0


@pytest.mark.parametrize("precompile", [True, False])
def test_startup_second_launch_hits_the_cache(tmp_path, precompile):
    """Inductor on CPU, TE + U-Net + VAE compiled: the warm launch loads whole precompiled functions
    (no dynamo tracing at all), or with precompile=False hits inductor's FX-graph cache."""
    import streamedit.bench.command as bench
    from streamedit.cli.group import _Group

    out = tmp_path / "s.jsonl"
    profile = ["--startup-profile", str(tmp_path / "prof")] if precompile else []  # + a cProfiled warm launch
    group = _Group("streamedit", commands={"bench": bench.bench_command})
    res = CliRunner().invoke(group, ["bench", "--model", "random:tiny", "--device", "cpu", "--size", "64",
                                     "--batch", "2", "--set", "compile=True", "--set", "te_fast=True",
                                     "--set", f"precompile={precompile}", "--startup-only",
                                     "--json", str(out)] + profile, catch_exceptions=False)
    assert res.exit_code == 0, res.output
    (row,) = [json.loads(line) for line in out.read_text().splitlines()]
    cold, warm = row["cold"], row["warm"]
    assert row["row"] == "startup" and row["cold_s"] == cold["first_frame_s"] > cold["engine_s"] > cold["import_s"]
    assert row["first_frame_max_diff"] == 0  # the loaded code computes the same frame, bit for bit (CPU)
    assert cold["compile_phases_s"].get("bytecode_tracing", 0) > 0
    if precompile:  # TE, U-Net + decode, VAE encode; a function that falls back says why (in the report too)
        assert cold["precompiled_fallbacks"] == warm["precompiled_fallbacks"] == {}
        assert cold["precompiled"] == {"compiled": 3, "loaded": 0, "fallback": 0, "stale": 0}
        assert warm["precompiled"] == {"compiled": 0, "loaded": 3, "fallback": 0, "stale": 0}
        assert "bytecode_tracing" not in warm["compile_phases_s"]  # dynamo never traced in the warm launch
        assert row["profile"] == str(tmp_path / "prof" / "warm-profiled.prof") and Path(row["profile"]).is_file()
        assert "bench/startup.py" in (tmp_path / "prof" / "warm-profiled.txt").read_text()
        names = ("te", "encode", "main")  # seconds each function's first call spent compiling / loading it
        assert set(cold["precompiled_s"]) == {f"compiled:{n}" for n in names}
        assert set(warm["precompiled_s"]) == {f"loaded:{n}" for n in names}
    else:
        assert cold["precompiled"]["compiled"] == warm["precompiled"]["loaded"] == 0
        assert cold["cache"].get("fxgraph_cache_miss", 0) >= 3 and cold["cache"].get("fxgraph_cache_hit", 0) == 0
        assert warm["cache"].get("fxgraph_cache_hit", 0) >= 3 and warm["cache"].get("fxgraph_cache_miss", 0) == 0
    assert cold["cache_dir"] == warm["cache_dir"] and cold["cache_dir"].endswith("inductor")
    assert row["cache_mib"] > 0 and "first frame" in res.output


# ---- 5. low latency ---------------------------------------------------------------------------------------
def camera(n, delivered, timeout):
    """Frame i+1 is only captured once the output of frame i was delivered (or the timeout passes)."""
    for i in range(n):
        if i and not delivered.wait(timeout):
            raise TimeoutError(f"frame {i} waited for output {i - 1}")
        delivered.clear()
        yield scene(i)


@pytest.mark.parametrize("low_latency", [True, False])
def test_low_latency_hands_out_a_frame_before_the_next_arrives(tiny_models, low_latency):
    delivered = threading.Event()
    engine = StreamEngine(tiny_models, EngineConfig(prompt="x", batch_size=1, size=64, seed=3, prefetch=1,
                                                    low_latency=low_latency))
    outs = []
    try:
        if not low_latency:  # the throughput schedule pulls frame k+1 before it hands out frame k
            with pytest.raises(TimeoutError):
                for out in engine.run(camera(4, delivered, 1.0)):
                    delivered.set()
            return
        for out in engine.run(camera(6, delivered, 20.0)):
            outs.append(out)
            delivered.set()
    finally:
        engine.close()
    ref, _ = run(tiny_models, [scene(i) for i in range(6)], prompt="x", batch_size=1)
    assert len(outs) == 6 and all(np.array_equal(a, b) for a, b in zip(outs, ref))


def test_low_latency_errors_and_early_stop(tiny_models):
    def broken():
        yield scene(0)
        raise ValueError("camera unplugged")

    engine = StreamEngine(tiny_models, EngineConfig(prompt="x", batch_size=1, size=64, low_latency=True))
    try:
        with pytest.raises(ValueError, match="unplugged"):
            list(engine.run(broken()))
        gen = engine.run(scene(i) for i in range(100))
        next(gen)
        gen.close()
        time.sleep(0.3)
        assert not any(t.name == "streamedit-reader" for t in threading.enumerate())
    finally:
        engine.close()


def test_low_latency_preset_and_row():
    import streamedit.bench.command as bench
    from streamedit.config import LOW_LATENCY

    assert LOW_LATENCY["batch_size"] == 1 and LOW_LATENCY["low_latency"] and LOW_LATENCY["te_fast"]
    row = dict(bench.MATRIX)["low-latency"]
    config, notes = bench.build_config({"prompt": "x"}, row, {})
    assert config.batch_size == 1 and config.low_latency and config.compile and row["source_fps"] == 30 and not notes
    assert dict(bench.MATRIX)["fp8"]["te_fp8"] and dict(bench.MATRIX)["best"]["compile_vae"]
    from streamedit.cli.group import cli

    res = CliRunner().invoke(cli, ["stylize", "in.mp4", "-o", "o.mp4", "-p", "x", "--low-latency", "--batch", "4"])
    assert res.exit_code == 2 and "--low-latency runs batch 1" in res.stderr
