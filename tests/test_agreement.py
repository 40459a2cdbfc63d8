"""The engine probe and ``bench --agreement`` (bench/agreement.py) on CPU with random:tiny: the probe leaves the
outputs alone and records what a sequential eager computation gives; a compiled row sits at the bf16 floor, an
approximation does not; the JSON fields and the table column."""

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import streamedit.bench.command as bench
from streamedit import EngineConfig, StreamEngine
from streamedit.bench import agreement as agree
from streamedit.cli.group import _Group
from streamedit.diffusion.denoiser import Denoiser
from streamedit.engine.probe import EngineProbe
from streamedit.text.exact import TextEncoderRunner


@pytest.fixture(autouse=True)
def private_compile_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("STREAMEDIT_CACHE_DIR", str(tmp_path / "compile-cache"))
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def config(**kw):
    return EngineConfig(**{"prompt": "oil painting", "batch_size": 2, "size": 64, "frame_size": (64, 64), **kw})


def probed(models, cfg, frames, probe):
    with StreamEngine(models, cfg) as engine:
        engine.probe = probe
        out = engine.process(frames)
    return out, engine


def test_probe_keeps_outputs_and_records_the_sequential_computation(tiny_models, frames):
    """Padded TE view (mask), 3 batches of which 2 are recorded: the probe's embeddings and latents are what
    upstream's TE runner and Denoiser.denoise give for its recorded noise, and the frames are unchanged."""
    models, cfg, frames = tiny_models, config(te_size=256, seed=5), frames[:6]
    plain, _ = probed(models, cfg, frames, None)
    probe = EngineProbe(2)
    out, _ = probed(models, cfg, frames, probe)
    assert all(np.array_equal(a, b) for a, b in zip(plain, out))
    assert [r.index for r in probe.records] == [0, 1] and probe.records[0].mask is not None
    te, den = TextEncoderRunner(models, te_size=256), Denoiser(models, cfg.steps, 64)
    for rec, batch in zip(probe.records, (frames[0:2], frames[2:4])):
        embeds = te.encode(cfg.prompt, te.prepare_images(batch), 2)
        mask = te.text_mask(cfg.prompt).expand(2, -1)
        source = den.encode_source(torch.from_numpy(np.stack(batch)))
        latents = den.denoise(rec.noise, source, embeds, mask)
        assert torch.equal(rec.embeds, embeds) and torch.equal(rec.mask, mask)
        assert torch.allclose(rec.latents, latents, atol=1e-6, rtol=0)
    # the record depends on the batch: batch 1's latents are not batch 0's
    assert not torch.allclose(probe.records[0].latents, probe.records[1].latents, atol=1e-3)
    # replayed noise: another seed's engine computes the same thing
    again = EngineProbe(2, noise=[r.noise for r in probe.records])
    probed(models, config(te_size=256, seed=9), frames[:4], again)
    assert all(torch.equal(a.latents, b.latents) for a, b in zip(probe.records, again.records))


def test_fused_graph_latents_and_agreement_verdicts(tiny_models, frames):
    """bf16 models: the compiled fused U-Net + decode (aot_eager on CPU) returns its final latents, which the
    probe records; that row sits at the bf16 floor (exact), the TE reused for 8 batches does not."""
    models = agree.cast_models(tiny_models, torch.bfloat16, {})
    frames = frames[:6]
    pending = {}
    for name, kw in (("compiled", {"compile": True, "compile_backend": "aot_eager"}), ("te-reuse", {"te_refresh_every": 8})):
        cfg = config(**kw)
        row = agree.PendingRow(cfg, frames, EngineProbe(2))
        out, engine = probed(models, cfg, frames, row.probe)
        row.adapter = agree.host_adapter(engine.adapter)
        pending[name] = row
        if name == "compiled":
            assert engine.denoiser.fused is not None
            eager = EngineProbe(2)
            eager_out, _ = probed(models, config(), frames, eager)
            assert max(int(np.abs(a.astype(int) - b).max()) for a, b in zip(out, eager_out)) <= 1
            for got, ref in zip(row.probe.records, eager.records):
                assert torch.allclose(got.latents.float(), ref.latents.float(), atol=2e-2, rtol=0)
    found = agree.measure_all(models, pending, echo=lambda *a, **k: None)
    ok, bad = found["compiled"], found["te-reuse"]
    assert ok["floor_dtype"] == "bfloat16" and ok["frames"] == 4 and ok["batches"] == 2
    assert 0 < ok["floor"]["te"]["rel_l2"] < 0.05 and 0 < ok["floor"]["latents"]["rel_l2"] < 0.05
    assert ok["exact"] and max(ok["ratio_to_floor"].values()) <= agree.EXACT_FACTOR
    assert not bad["exact"] and bad["ratio_to_floor"]["te"] > 10 and bad["te"]["cosine"] < 0.99


def invoke(*args):
    group = _Group("streamedit", commands={"bench": bench.bench_command})
    return CliRunner().invoke(group, ["bench", *args], catch_exceptions=False)


def test_bench_agreement_fields_and_exact_column(tmp_path):
    """float32 models: the eager row equals its reference (0 against a bf16 floor), the approximations do not."""
    out = tmp_path / "bench.jsonl"
    res = invoke("--model", "random:tiny", "--device", "cpu", "--size", "64", "--batch", "2", "--frames", "4",
                 "--source-fps", "0", "--rows", "no-compile,approx", "--set", "compile=False", "--agreement",
                 "--json", str(out))
    assert res.exit_code == 0, res.output
    rows = {r["row"]: r for r in map(json.loads, out.read_text().splitlines())}
    exact, approx = rows["no-compile"]["agreement"], rows["approx"]["agreement"]
    for a in (exact, approx):
        for part in (a, a["floor"]):
            for k in ("te", "latents"):
                assert set(part[k]) == {"rel_l2", "cosine", "cosine_min"}
        assert a["exact_factor"] == agree.EXACT_FACTOR and a["reference"] == agree.REFERENCE
    assert exact["exact"] and exact["te"]["rel_l2"] == 0 and exact["latents"]["rel_l2"] == 0
    assert not approx["exact"] and approx["te"]["rel_l2"] > agree.EXACT_FACTOR * approx["floor"]["te"]["rel_l2"]
    table = res.output[res.output.index("row "):]
    assert "exact (x floor)" in table.splitlines()[0]
    assert "yes 0x" in table and "NO " in table and "vs fp32 eager (4 frames)" in table
    # off by default on CPU
    res = invoke("--model", "random:tiny", "--device", "cpu", "--size", "64", "--batch", "2", "--frames", "4",
                 "--source-fps", "0", "--set", "te_refresh_every=100", "--json", str(out))
    assert res.exit_code == 0 and "agreement" not in json.loads(out.read_text()) and "exact (x floor)" not in res.output
