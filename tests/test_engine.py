"""The engine against diffusers' own DreamLiteMobilePipeline, a sequential schedule and per-frame runs."""

import dataclasses

import numpy as np
import pytest
import torch
from PIL import Image

from streamedit import EngineConfig, StreameditError, StreamEngine
from streamedit.accel.kernels import shallow
from streamedit.text.exact import prenorm_model


def upstream_pipeline(models):
    """diffusers' pipeline over the same weights, fed DreamLite's features.

    DreamLite-mobile was trained with transformers 4.57, whose ``hidden_states[-1]`` (what the pipeline
    reads) is the last decoder layer's output before the final norm; transformers >= 5 returns the
    normed output there. The pipeline's text encoder is a parameter-sharing copy without that norm,
    so the reference computes the trained features on any transformers version.
    """
    pipe = models.pipeline()
    te = models.text_encoder
    if models.te_features == "prenorm":  # a model trained on the normed output (the demo) takes it as is
        pipe.text_encoder = shallow(te, model=prenorm_model(te.model))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _engine(models, **kw):
    cfg = dict(prompt="oil painting", batch_size=1, steps=1, size=64, seed=3, fixed_noise=True, frame_size=(64, 64))
    cfg.update(kw)
    return StreamEngine(models, EngineConfig(**cfg))


def _wide(frames, width=96):
    """The fixture's content at 64 x ``width`` (non-square; smooth, so a tiny model still tells frames apart)."""
    return [np.ascontiguousarray(np.concatenate([f, f[:, ::-1]], axis=1)[:, :width]) for f in frames]


def _capture_latents(engine):
    seen = []
    decode = engine.denoiser.decode
    engine.denoiser.decode = lambda lat: (seen.append(lat.clone()), decode(lat))[1]
    return seen


@pytest.mark.parametrize("steps,width", [(1, 64), (4, 64), (1, 96), (4, 96)])
def test_matches_diffusers_pipeline(tiny_models, frames, steps, width):
    """Also at a non-square working size (64 x 96): latent shape, time_ids (W, H) and the shift's
    sequence length all follow upstream's for that image."""
    pipe = upstream_pipeline(tiny_models)
    frames = frames if width == 64 else _wide(frames, width)
    engine = _engine(tiny_models, steps=steps, size=max(64, width), frame_size=(64, width))
    assert engine.shape == (64, width)
    latents = _capture_latents(engine)
    outs = list(engine.run(frames[:2]))
    for frame, out, lat in zip(frames[:2], outs, latents):
        def upstream(output_type, seed=3):
            return pipe("oil painting", image=Image.fromarray(frame), num_inference_steps=steps,  # size: the image's
                        generator=torch.Generator("cpu").manual_seed(seed), output_type=output_type).images

        assert out.shape == frame.shape
        assert np.abs(out / 255.0 - upstream("np")[0]).max() <= 1 / 255
        ref_lat = upstream("latent")
        assert (lat - ref_lat).abs().max() < 1e-4
        # the comparison can fail: another seed moves the latents far beyond the tolerance
        other = upstream("latent", seed=4)
        assert (other - ref_lat).abs().max() > 1e-1


def test_prompt_embeddings_match_upstream(tiny_models, frames):
    pipe = upstream_pipeline(tiny_models)
    engine = _engine(tiny_models)
    images = engine.te.prepare_images(frames[:2])
    ours = engine.te.encode("oil painting", images, 2)
    upstream_wrapped = ("[Edit]: A diptych with two side-by-side images of the same scene. "
                        "Compared to the right side, the left one has oil painting")
    for i in range(2):
        ref, mask = pipe.encode_prompt("edit", [upstream_wrapped], torch.device("cpu"), torch.float32,
                                       image=Image.fromarray(frames[i]))
        assert ref.shape == ours[i:i + 1].shape and bool(mask.all())
        assert (ours[i:i + 1] - ref).abs().max() < 1e-5
    assert (ours[0] - ours[1]).abs().max() > 1e-3  # frames really change the conditioning
    # the stock pipeline on transformers >= 5 reads the normed output: not what DreamLite was trained on
    stock, _ = tiny_models.pipeline().encode_prompt("edit", [upstream_wrapped], torch.device("cpu"), torch.float32,
                                                    image=Image.fromarray(frames[0]))
    assert (ours[0:1] - stock).abs().max() > 1e-1


def test_a_normed_feature_model_matches_the_stock_pipeline(tiny_models, frames):
    """A model trained on the normed output (``te_features: normed``, the bundled demo) gets exactly what
    diffusers' unmodified pipeline computes on transformers >= 5, end to end (the fast text encoder's
    normed features: test_te_fast)."""
    normed = dataclasses.replace(tiny_models, te_features="normed")
    pipe = upstream_pipeline(normed)
    assert pipe.text_encoder is tiny_models.text_encoder
    engine, prenorm = _engine(normed), _engine(tiny_models)
    latents, prenorm_latents = _capture_latents(engine), _capture_latents(prenorm)
    out = list(engine.run(frames[:1]))[0]
    list(prenorm.run(frames[:1]))

    def upstream(output_type):
        return pipe("oil painting", image=Image.fromarray(frames[0]), num_inference_steps=1,
                    generator=torch.Generator("cpu").manual_seed(3), output_type=output_type).images

    assert np.abs(out / 255.0 - upstream("np")[0]).max() <= 1 / 255
    ref = upstream("latent")
    assert (latents[0] - ref).abs().max() < 1e-4
    assert (prenorm_latents[0] - ref).abs().max() > 1e-2  # the convention reaches the U-Net: this can fail


@pytest.mark.parametrize("te_fast", [False, True])
def test_te_size_256_mask_reaches_the_unet(tiny_models, frames, te_fast):
    """The paper's TE view pads the sequence to 256 tokens; the U-Net sees the mask, so the pad rows carry
    no weight: the engine's latents equal the U-Net on the unpadded embeddings without a mask."""
    engine = _engine(tiny_models, batch_size=2, te_size=256, te_fast=te_fast)
    calls, denoise = [], engine.denoiser.denoise
    engine.denoiser.denoise = lambda *args: (calls.append([a.clone() for a in args]), denoise(*args))[1]
    list(engine.run(frames[:2]))
    (noise, source, embeds, mask), = calls
    prefix = tiny_models.edit_prefix_len
    assert embeds.shape[1] == mask.shape[1] == 256 - prefix and mask.shape[0] == 2
    real = int(mask[0].sum())
    assert 0 < real < 256 - prefix and not embeds[:, real:].any()
    ours = denoise(noise, source, embeds, mask)
    unpadded = denoise(noise, source, embeds[:, :real])
    assert (ours - unpadded).abs().max() < 1e-5
    # without the mask the zero pad rows would be attended to: the comparison can fail
    assert (denoise(noise, source, embeds) - unpadded).abs().max() > 1e-3


@pytest.mark.parametrize("width", [64, 96])
def test_pipelined_equals_sequential(tiny_models, frames, width):
    frames = frames if width == 64 else _wide(frames, width)
    kw = dict(batch_size=4, fixed_noise=False, size=max(64, width), frame_size=(64, width))
    a = list(_engine(tiny_models, pipeline=True, **kw).run(frames))
    b = list(_engine(tiny_models, pipeline=False, **kw).run(frames))
    assert len(a) == len(b) == len(frames) and a[0].shape == (64, width, 3)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))


def test_first_frame_decides_the_working_size(tiny_models, frames):
    """Without frame_size the first frame's aspect fixes the working size: 128x72-ish input at size 96
    works at 64 x 96 (short side rounded to 32), not squashed to 96 x 96; --crop-style works square."""
    wide = [np.ascontiguousarray(np.repeat(f, 2, axis=1)[:, :114]) for f in frames[:3]]  # 64 x 114
    engine = _engine(tiny_models, size=96, frame_size=None)
    assert engine.shape is None and engine.denoiser is None
    outs = list(engine.run(wide))
    assert engine.shape == (64, 96) and engine.denoiser.latent_shape == (8, 12)
    assert [o.shape for o in outs] == [(64, 96, 3)] * 3
    assert engine.denoiser.time_ids.tolist() == [[96.0, 64.0]]  # upstream's (W, H)
    cropped = _engine(tiny_models, size=64, frame_size=None, crop=True)
    assert cropped.shape == (64, 64)
    assert list(cropped.run(wide[:1]))[0].shape == (64, 64, 3)


def test_batched_matches_per_frame(tiny_models, frames):
    batched = _engine(tiny_models, batch_size=4, fixed_noise=False)
    single = _engine(tiny_models, batch_size=1, fixed_noise=False)
    lat_b, lat_s = _capture_latents(batched), _capture_latents(single)
    out_b, out_s = list(batched.run(frames)), list(single.run(frames))
    assert len(out_b) == len(out_s) == 10  # 10 frames at B=4: the padded tail is dropped
    lb = torch.cat(lat_b)[:10]
    ls = torch.cat(lat_s)
    assert (lb - ls).abs().max() < 1e-4
    assert max(np.abs(x.astype(int) - y).max() for x, y in zip(out_b, out_s)) <= 1


def test_te_refresh_and_batch_one(tiny_models, frames):
    engine = _engine(tiny_models, batch_size=2, te_refresh_every=3, te_batch_one=True)
    list(engine.run(frames))  # 5 batches
    assert [e.te for e in engine.batch_log] == ["computed", "reused", "reused", "computed", "reused"]
    assert engine.stats.te_calls == 2 and engine.stats.te_frames == 2


def test_te_batch_one_broadcasts_first_frame(tiny_models, frames):
    engine = _engine(tiny_models, batch_size=2, te_batch_one=True)
    seen = []
    encode = engine.te.encode
    engine.te.encode = lambda p, imgs, b: (seen.append((imgs["image_grid_thw"].shape[0], b)), encode(p, imgs, b))[1]
    list(engine.run(frames[:4]))
    assert seen == [(1, 1), (1, 1)]


@pytest.mark.parametrize("pipeline", [False, True])
def test_set_prompt_forces_refresh(tiny_models, frames, pipeline):
    engine = _engine(tiny_models, batch_size=2, te_refresh_every=100, pipeline=pipeline)
    for i, _ in enumerate(engine.run(frames)):
        if i == 1:  # while the first batch's last frame is handed out
            engine.set_prompt("watercolor")
    log = engine.batch_log
    first_new = 1 if not pipeline else 2  # with pipelining, batch 1 was already encoded ahead
    assert [e.prompt for e in log] == ["oil painting"] * first_new + ["watercolor"] * (5 - first_new)
    assert [e.te for e in log][first_new] == "computed"
    assert engine.stats.te_calls == 2


def test_padding_keeps_every_frame_in_order(tiny_models, frames):
    engine = _engine(tiny_models, batch_size=4, fixed_noise=True)
    outs = list(engine.run(frames[:7]))
    ref = list(_engine(tiny_models, batch_size=1, fixed_noise=True).run(frames[:7]))
    assert len(outs) == 7
    assert all(np.abs(a.astype(int) - b).max() <= 1 for a, b in zip(outs, ref))


def test_bad_config_and_prompt(tiny_models):
    with pytest.raises(StreameditError, match="te-size"):
        _engine(tiny_models, te_size=384)
    with pytest.raises(StreameditError, match="empty"):
        _engine(tiny_models, prompt="   ")
    with pytest.raises(StreameditError, match="steps"):
        _engine(tiny_models, steps=9)
    with pytest.raises(StreameditError, match="multiple of"):
        _engine(tiny_models, size=70)
    engine = _engine(tiny_models, prompt="x" * 5000)
    assert len(engine.prompt) == 2000


def test_batch_log_is_bounded(tiny_models, frames):
    engine = _engine(tiny_models, batch_size=1, log_limit=3)
    list(engine.run(frames))
    assert [e.batch for e in engine.batch_log] == [7, 8, 9]  # newest entries kept
    assert engine.stats.batches == 10


@pytest.mark.parametrize("steps", [1, 2])
def test_strength_start_matches_the_schedulers_own_noising_and_steps(tiny_models, frames, steps):
    """strength < 1: the scheduler's scale_noise of the source latent, then its own Euler steps."""
    import copy

    from streamedit.diffusion.denoiser import Denoiser, sigma_schedule

    den = Denoiser(tiny_models, steps, 64, strength=0.5)
    src = den.encode_source(torch.from_numpy(np.stack(frames[:2])))
    gen = torch.Generator("cpu").manual_seed(0)
    noise = torch.randn(src.shape, generator=gen)
    cfg = tiny_models.unet.config
    embeds = torch.randn(2, 7, cfg.get("encoder_hid_dim") or cfg.cross_attention_dim, generator=gen)
    out = den.denoise(noise, src, embeds)

    sched = copy.deepcopy(tiny_models.scheduler)
    shifted, _ = sigma_schedule(tiny_models, 64, np.linspace(0.5, 0.5 / steps, steps))
    sched.set_timesteps(sigmas=np.linspace(0.5, 0.5 / steps, steps), mu=_mu(tiny_models, 64))
    assert torch.allclose(sched.sigmas, shifted)
    x = sched.scale_noise((src - den.shift) * den.scaling, sched.timesteps[:1], noise)
    with torch.no_grad():
        for t in sched.timesteps:
            v = tiny_models.unet(torch.cat([x, src], dim=3), timestep=t.expand(2), encoder_hidden_states=embeds,
                                 added_cond_kwargs={"time_ids": den.time_ids.expand(2, -1)},
                                 return_dict=False)[0][..., :src.shape[-1]]
            x = sched.step(v, t, x).prev_sample
    assert (out - x).abs().max() < 1e-4
    # strength matters: the pure-noise start lands elsewhere
    assert (Denoiser(tiny_models, steps, 64).denoise(noise, src, embeds) - x).abs().max() > 1e-2


def _mu(models, size):
    from diffusers.pipelines.dreamlite.pipeline_dreamlite_mobile import calculate_shift

    cfg, latent = models.scheduler.config, size // models.vae_scale_factor
    return calculate_shift(latent * latent // 4, cfg.get("base_image_seq_len", 256), cfg.get("max_image_seq_len", 4096),
                           cfg.get("base_shift", 0.5), cfg.get("max_shift", 1.16))


def test_strength_default_comes_from_the_model_folder(tiny_models, frames):
    tiny_models.extras["strength"] = 0.4
    try:
        assert _engine(tiny_models).denoiser.strength == 0.4
        assert _engine(tiny_models, strength=1.0).denoiser.strength == 1.0
        with pytest.raises(StreameditError, match="strength"):
            _engine(tiny_models, strength=1.5)
    finally:
        del tiny_models.extras["strength"]
    assert _engine(tiny_models).denoiser.strength == 1.0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="stream priorities need a CUDA device")
def test_main_priority_runs_the_main_stream_high_and_changes_no_output(frames):
    from streamedit import load_models

    models = load_models("random:tiny", device="cuda")
    outs = {}
    for prio in (False, True):
        engine = _engine(models, main_priority=prio, fixed_noise=True)
        outs[prio] = np.stack(list(engine.run(frames)))
        if prio:  # a lower number is a higher priority
            assert engine.main_stream.priority < engine.side_stream.priority
        engine.close()
    assert np.abs(outs[True].astype(int) - outs[False]).max() <= 1  # bf16/TF32 kernels may differ by a level
