"""LLLite adapter: forwards, compile friendliness, patch/unpatch, hook subsets, checkpoints (CPU, tiny U-Net)."""

from __future__ import annotations

import logging

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from streamedit.errors import StreameditError
from streamedit.models.architectures import REAL_UNET
from streamedit.models.loading import load_models
from streamedit.temporal.adapter import LLLiteAdapter, apply_lllite, remove_lllite
from streamedit.temporal.checkpoint import read_checkpoint
from streamedit.temporal.hooks import hook_sites

COND = 64  # cond image side for the tiny U-Net (latent 8x8, token grids 8x16 / 4x8 / 2x4)
B = 2
BACKEND = "eager"


@pytest.fixture(scope="module")
def unet():
    u = load_models("random:tiny").unet
    yield u
    remove_lllite(u)


@pytest.fixture(autouse=True)
def _unpatched(unet):
    remove_lllite(unet)
    yield
    remove_lllite(unet)


def inputs(batch=B, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, 4, COND // 8, 2 * COND // 8, generator=g), torch.full((batch,), 700.0),
            torch.randn(batch, 7, 64, generator=g), torch.tensor([[float(COND), float(COND)]] * batch))


def run(unet, sample, timestep, ehs, time_ids):
    """Called the way the engine calls it."""
    return unet(sample, timestep, encoder_hidden_states=ehs, added_cond_kwargs={"time_ids": time_ids},
                return_dict=False)[0]


def cond_images(batch=B, seed=1):
    return torch.rand(batch, 3, COND, COND, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def randomize(adapter, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in adapter.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return adapter


def public_state_dict(adapter):
    """The adapter's weights in dreamlite-lllite's LLLiteController.state_dict() layout."""
    return {f"modules_dict.{hook.replace('.', '__')}.{part}": t.clone()
            for hook, m in adapter.items() for part, t in m.state_dict().items()}


@torch.no_grad()
def test_fresh_adapter_is_bit_identical(unet):
    x = inputs()
    base = run(unet, *x)
    adapter = LLLiteAdapter.for_unet(unet, hooks="all", cond_size=COND)
    apply_lllite(unet, adapter)
    adapter.set_cond_image(cond_images())
    assert torch.equal(run(unet, *x), base)


def test_training_and_inference_forwards_agree(unet):
    x = inputs()
    with torch.no_grad():
        base = run(unet, *x)
    adapter = randomize(LLLiteAdapter.for_unet(unet, hooks="all", cond_size=COND))
    apply_lllite(unet, adapter, inference_mode=True)
    adapter.eval()
    adapter.set_cond_image(cond_images())
    adapter.set_multiplier(0.7)
    with torch.no_grad():
        out_inf = run(unet, *x)
    remove_lllite(unet)

    apply_lllite(unet, adapter, inference_mode=False)
    adapter.train()
    adapter.set_cond_image(cond_images())
    out_tr = run(unet, *x)
    assert (out_inf - base).abs().max() > 1e-2  # the adapter really acts
    torch.testing.assert_close(out_tr, out_inf, atol=1e-5, rtol=0)
    out_tr.square().mean().backward()
    m = adapter.module_for(adapter.hooks[0])
    assert m.conditioning1[0].weight.grad is not None and m.up[0].weight.grad.abs().sum() > 0


def test_remove_restores_original_forward(unet):
    x = inputs()
    with torch.no_grad():
        base = run(unet, *x)
    hooks = hook_sites(unet)
    keys = list(unet.state_dict())
    custom = unet.get_submodule(hooks[-1])
    custom.forward = own = nn.Linear.forward.__get__(custom)  # someone else's instance-level forward
    adapter = randomize(LLLiteAdapter.for_unet(unet, hooks="all", cond_size=COND))
    apply_lllite(unet, adapter)
    adapter.set_cond_image(cond_images())
    assert all("forward" in vars(unet.get_submodule(h)) for h in hooks)
    assert list(unet.state_dict()) == keys  # the patch leaves the module tree alone
    with pytest.raises(StreameditError, match="already applied"):
        apply_lllite(unet, adapter)
    assert remove_lllite(unet) == len(hooks)
    for h in hooks[:-1]:
        host = unet.get_submodule(h)
        assert "forward" not in vars(host) and host.forward.__func__ is nn.Linear.forward
        assert not any(k.startswith("_lllite") for k in vars(host))
    assert custom.forward is own
    del custom.forward
    assert list(unet.state_dict()) == keys
    with torch.no_grad():
        assert torch.equal(run(unet, *x), base)


def test_compile_fullgraph_no_breaks_no_recompiles(unet):
    x = inputs()
    adapter = randomize(LLLiteAdapter.for_unet(unet, hooks="down", cond_size=COND)).eval()
    apply_lllite(unet, adapter)
    adapter.set_cond_image(cond_images())  # allocates the buffers before compiling

    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    compiles = []

    def counting_backend(gm, example_inputs):  # called once per (re)compilation
        compiles.append(gm)
        return torch._dynamo.lookup_backend(BACKEND)(gm, example_inputs)

    compiled = torch.compile(unet, fullgraph=True, backend=counting_backend)
    previous = None
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for i in range(21):
            if i:
                adapter.set_cond_image(cond_images(seed=100 + i))
                adapter.set_multiplier(float(torch.rand((), generator=g)) * 1.5)
            out = run(compiled, *x)
            if i in (0, 1, 20):  # the compiled graph reads the updated buffers
                torch.testing.assert_close(out, run(unet, *x), atol=1e-5, rtol=1e-5)
            if previous is not None:
                assert not torch.equal(out, previous)
            previous = out
    assert not torch._dynamo.utils.counters["graph_break"]
    assert len(compiles) == 1
    torch._dynamo.reset()


@torch.no_grad()
def test_cond_batch_tiling_and_cfg_batch(unet):
    adapter = randomize(LLLiteAdapter.for_unet(unet, hooks="down", cond_size=COND))
    apply_lllite(unet, adapter)
    adapter.allocate(B, COND, COND)
    buf = adapter.module_for(adapter.hooks[0]).cond_emb
    adapter.set_cond_image((cond_images(1) * 127.5 + 127.5).to(torch.uint8))
    assert adapter.module_for(adapter.hooks[0]).cond_emb is buf  # written in place
    assert torch.equal(buf[0], buf[1])
    out = run(unet, *inputs(batch=2 * B))  # CFG-doubled U-Net batch repeats the cond rows
    assert out.shape[0] == 2 * B
    with pytest.raises(StreameditError, match="tokens"):
        adapter.set_cond_image(cond_images(seed=3)[:, :, :32, :32])
        run(unet, *inputs())


@torch.no_grad()
def test_batched_cond_embedding_equals_each_modules_convs(unet):
    """One GEMM per layer for all hooks (lllite_cond) = each hook's own strided convs (fp32), also
    after a weight changes in place (the packed weights are rebuilt)."""
    adapter = randomize(LLLiteAdapter.for_unet(unet, hooks="all", cond_size=COND))
    groups = adapter._by_stride()
    assert sorted(groups) == [8, 16, 32] and max(len(m) for m in groups.values()) > 1
    images = cond_images(3)

    def check():
        got = adapter.embed(images)
        assert adapter._embedder  # the batched path ran
        for stride, mods in groups.items():
            for i, m in enumerate(mods):
                want = m.conditioning1(images).permute(0, 2, 3, 1)
                assert torch.allclose(got[stride][:, :, :, i], want, atol=1e-5)

    check()
    mods = groups[32]
    mods[-1].conditioning1[0].weight.mul_(-2.0)  # in place: same address, new version
    mods[0].conditioning1[-1].bias.add_(1.0)
    check()


@torch.no_grad()
def test_cond_buffers_one_per_stride_survive_to(unet):
    adapter = randomize(LLLiteAdapter.for_unet(unet, hooks="all", cond_size=COND))
    apply_lllite(unet, adapter)
    images = cond_images()
    adapter.set_cond_image(images)

    def shared():  # every hook of a stride views one buffer
        return all(len({m.cond_emb.untyped_storage().data_ptr() for m in mods}) == 1
                   for mods in adapter._by_stride().values())

    before = [m.cond_emb.clone() for _, m in adapter.items()]
    for (_, m), ref in zip(adapter.items(), before):
        assert torch.allclose(ref, m.embed(images), atol=1e-5)
    assert shared()
    adapter.to(torch.float64)  # each view is moved on its own; the buffers are rebuilt with the contents
    assert shared()
    for (_, m), ref in zip(adapter.items(), before):
        assert m.cond_emb.dtype == torch.float64 and torch.equal(m.cond_emb, ref.double())
    adapter.set_cond_rows(cond_images(1, seed=5).double(), torch.tensor([1]))
    for (_, m), ref in zip(adapter.items(), before):
        assert torch.equal(m.cond_emb[0], ref[0].double())
        assert torch.allclose(m.cond_emb[1], m.embed(cond_images(1, seed=5).double())[0])
    adapter.to(torch.float32)


def test_hook_subset_counts_real_unet_on_meta():
    from diffusers import DreamLiteUNetModel

    with torch.device("meta"):
        real = DreamLiteUNetModel(**REAL_UNET)
    counts = {s: len(LLLiteAdapter.for_unet(real, hooks=s, cond_size=512).hooks) for s in ("all", "down", "mid", "up")}
    assert counts == {"all": 108, "down": 38, "mid": 16, "up": 54}
    names = hook_sites(real)
    adapter = LLLiteAdapter.for_unet(real, hooks=[names[0], names[-1]], cond_size=512)
    assert adapter.hooks == [names[0], names[-1]]
    strides = {h.split(".attentions")[0]: m.stride for h, m in LLLiteAdapter.for_unet(real, "all").items()}
    assert strides == {"down_blocks.0": 8, "down_blocks.1": 16, "down_blocks.2": 32, "mid_block": 32,
                       "up_blocks.0": 32, "up_blocks.1": 16}
    with pytest.raises(StreameditError, match="not hook sites"):
        LLLiteAdapter.for_unet(real, hooks=["down_blocks.0.resnets.0.conv1"])


def test_save_load_round_trip(unet, tmp_path):
    adapter = randomize(LLLiteAdapter.for_unet(unet, hooks="down", cond_size=COND, mlp_dim=16, cond_emb_dim=8))
    path = tmp_path / "a.safetensors"
    adapter.save(path)
    _, meta, layout, _ = read_checkpoint(path, unet)
    assert layout == "streamedit" and meta["cond_size"] == str(COND)
    loaded = LLLiteAdapter.load(path, unet)
    assert loaded.config == adapter.config and loaded.hooks == adapter.hooks
    for (k, a), (k2, b) in zip(adapter.state_dict().items(), loaded.state_dict().items()):
        assert k == k2 and torch.equal(a, b)


def test_load_public_controller_layout_with_subset_notice(unet, tmp_path, caplog):
    source = randomize(LLLiteAdapter.for_unet(unet, hooks="all", cond_size=COND))
    path = tmp_path / "temporal_lllite_step001440.safetensors"
    save_file(public_state_dict(source), str(path),
              {"cond_type": "temporal", "cond_emb_dim": "32", "mlp_dim": "64", "step": "1440", "model": "m"})
    assert read_checkpoint(path, unet)[2] == "dreamlite-lllite"
    with caplog.at_level(logging.WARNING, logger="streamedit.temporal.checkpoint"):
        loaded = LLLiteAdapter.load(path, unet, hooks="down", cond_size=COND)
    n_down = len([h for h in source.hooks if h.startswith("down")])
    assert loaded.hooks == [h for h in source.hooks if h.startswith("down")]
    records = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(records) == 1 and "\n" not in records[0].getMessage()
    assert f"skipped weights of {len(source.hooks) - n_down} hook(s)" in records[0].getMessage()
    for hook in loaded.hooks:
        for part, t in loaded.module_for(hook).state_dict().items():
            assert torch.equal(t, source.module_for(hook).state_dict()[part])

    kohya = {k.replace("modules_dict.", "lllite_unet_").replace("__", "_"): t
             for k, t in public_state_dict(source).items()}
    save_file(kohya, str(tmp_path / "k.safetensors"))
    assert LLLiteAdapter.load(tmp_path / "k.safetensors", unet, cond_size=COND).hooks == source.hooks


def test_shape_mismatch_names_key_and_shapes(unet, tmp_path):
    sd = public_state_dict(LLLiteAdapter.for_unet(unet, hooks="down", cond_size=COND))
    key = next(k for k in sd if k.endswith("up.0.weight"))
    sd[key] = torch.zeros(sd[key].shape[0] + 1, sd[key].shape[1])
    path = tmp_path / "bad.safetensors"
    save_file(sd, str(path))
    with pytest.raises(StreameditError) as err:
        LLLiteAdapter.load(path, unet, cond_size=COND)
    msg = str(err.value)
    assert key in msg and str(tuple(sd[key].shape)) in msg and str((sd[key].shape[0] - 1, 64)) in msg


def test_missing_and_corrupt_files(unet, tmp_path):
    with pytest.raises(StreameditError, match="not found"):
        LLLiteAdapter.load(tmp_path / "nope.safetensors", unet)
    bad = tmp_path / "corrupt.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    with pytest.raises(StreameditError, match="could not read LLLite checkpoint") as err:
        LLLiteAdapter.load(bad, unet)
    assert "\n" not in str(err.value)


def test_public_layout_conditioning_stride_is_inferred(unet, tmp_path):
    # a dreamlite-lllite file trained with cond images at half the pixel size (stride 4/8/16 CNNs)
    source = randomize(LLLiteAdapter.for_unet(unet, hooks="down", cond_size=COND // 2, vae_scale=4))
    save_file(public_state_dict(source), str(tmp_path / "half.safetensors"))
    loaded = LLLiteAdapter.load(tmp_path / "half.safetensors", unet, cond_size=COND // 2)
    assert loaded.config.vae_scale == 4 and loaded.config.cond_emb_dim == 32 and loaded.config.mlp_dim == 64
    apply_lllite(unet, loaded)
    loaded.set_cond_image(cond_images()[:, :, ::2, ::2])
    with torch.no_grad():
        assert run(unet, *inputs()).shape == (B, 4, COND // 8, COND // 4)


@torch.no_grad()
def test_baked_multiplier_script_equals_the_runtime_multiplier(unet, tmp_path):
    """scripts/bake_lllite_multiplier.py: the baked file at multiplier 1 = the original at multiplier M."""
    import subprocess
    import sys
    from pathlib import Path

    src, dst = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    randomize(LLLiteAdapter.for_unet(unet, hooks="all", cond_size=COND)).save(src)
    script = Path(__file__).parents[1] / "scripts" / "bake_lllite_multiplier.py"
    done = subprocess.run([sys.executable, str(script), str(src), str(dst), "0.6", "--model", "random:tiny"],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    x, outs = inputs(), []
    for path, multiplier in ((src, 0.6), (dst, 1.0)):
        adapter = LLLiteAdapter.load(path, unet)
        apply_lllite(unet, adapter)
        adapter.set_cond_image(cond_images())
        adapter.set_multiplier(multiplier)
        outs.append(run(unet, *x))
        remove_lllite(unet)
    torch.testing.assert_close(outs[1], outs[0], atol=1e-5, rtol=1e-5)
    assert (outs[0] - run(unet, *x)).abs().max() > 1e-2  # the adapter acts, so the check can fail
