"""FastTextEncoderRunner against TextEncoderRunner (the upstream-equivalent path) and compile checks."""

import dataclasses

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import Qwen3VLForConditionalGeneration

from streamedit.accel.compile_te import compile_te
from streamedit.models.architectures import _te_config
from streamedit.text.exact import TextEncoderRunner
from streamedit.text.fast import FastTextEncoderRunner, _PrefixKV

TOL = 1e-4


def smooth_frames(size, n=3, seed=0):
    """Different, smooth content per frame (a tiny model maps noise frames to near-identical outputs)."""
    yy, xx = np.mgrid[0:size, 0:size] * (64.0 / size)
    out = []
    for t in range(n):
        r = 127 + 120 * np.sin((xx + 7 * t + seed) / 5.0)
        g = 127 + 120 * np.cos((yy - 5 * t) / (6.0 + t))
        b = 255.0 * ((xx * (t + 1) + yy + 11 * t) % 64) / 64
        out.append(np.stack([r, g, b], -1).astype(np.uint8))
    return out


def reference(models, prompt, frames_512, te_size=512):
    ref = TextEncoderRunner(models, te_size=te_size)
    return ref.encode(prompt, ref.prepare_images(frames_512), len(frames_512))


@pytest.fixture(scope="module")
def mid_models(tiny_models):
    """Several decoder layers, deepstack into 3 of them, a 48x48 learned position grid (resampled to 32x32)."""
    text = dict(hidden_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                intermediate_size=256, rope_theta=5e6, rms_norm_eps=1e-6, max_position_embeddings=4096,
                vocab_size=len(tiny_models.tokenizer),
                rope_scaling={"rope_type": "default", "mrope_section": [4, 6, 6], "mrope_interleaved": True})
    vision = dict(depth=4, hidden_size=64, intermediate_size=128, num_heads=4, out_hidden_size=128, patch_size=16,
                  spatial_merge_size=2, temporal_patch_size=2, deepstack_visual_indexes=[0, 1, 3],
                  num_position_embeddings=2304, in_channels=3)
    torch.manual_seed(1)
    te = Qwen3VLForConditionalGeneration(_te_config(tiny_models.tokenizer, text, vision)).eval()
    with torch.no_grad():  # the library initialises it to zero: a dropped bias would go unseen
        te.model.visual.patch_embed.proj.bias.normal_(0, 0.5)
    return dataclasses.replace(tiny_models, text_encoder=te)


def test_patchify_matches_image_processor(tiny_models):
    fast = FastTextEncoderRunner(tiny_models, 3)
    frames = smooth_frames(512)
    ours, grid = fast.patchify(fast.prepare_images(frames))
    ref = tiny_models.processor.image_processor(images=[Image.fromarray(f) for f in frames], return_tensors="pt")
    assert ours.dtype == ref["pixel_values"].dtype == torch.float32
    assert torch.equal(ours, ref["pixel_values"])  # bitwise: same table, same layout
    assert torch.equal(grid, ref["image_grid_thw"])
    # resize path (working size 64): patchify of our resized frames == the processor on them
    small = fast.prepare_images(smooth_frames(64))
    resized = fast.resize(small).permute(0, 2, 3, 1).numpy()
    ref = tiny_models.processor.image_processor(images=[Image.fromarray(f) for f in resized], return_tensors="pt")
    assert torch.equal(fast.patchify(small)[0], ref["pixel_values"])


def test_resize_approximates_lanczos(tiny_models):
    """The torch resize is bicubic+antialias, not PIL LANCZOS: documented approximation, kept close."""
    fast = FastTextEncoderRunner(tiny_models, 3)
    frames = smooth_frames(64)
    ours = fast.resize(fast.prepare_images(frames)).permute(0, 2, 3, 1).numpy().astype(int)
    pil = np.stack([np.asarray(Image.fromarray(f).resize((512, 512), Image.LANCZOS)) for f in frames]).astype(int)
    diff = np.abs(ours - pil)
    assert diff.mean() < 2.0 and diff.max() > 0  # not equal, but close on smooth content
    same = fast.prepare_images(smooth_frames(512))  # at the TE size the resize is the identity
    assert torch.equal(fast.resize(same), same.permute(0, 3, 1, 2))


@pytest.mark.parametrize("prompts", [("oil painting", "watercolor", "make it look like a lego city at sunset")])
def test_encode_matches_reference_at_512(tiny_models, prompts):
    fast = FastTextEncoderRunner(tiny_models, 3)
    frames = smooth_frames(512)
    host = fast.prepare_images(frames)
    assert host.dtype == torch.uint8 and host.shape == (3, 512, 512, 3)
    for prompt in prompts:  # prompt changes, token counts 357 / 356 / 364
        ref = reference(tiny_models, prompt, frames)
        ours = fast.encode(prompt, host, 3)
        assert ours.shape == ref.shape and ours.dtype == ref.dtype
        assert (ours - ref).abs().max() <= TOL
        assert (ours[0] - ours[1]).abs().max() > 1e-3  # frames really change the conditioning


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_te_size_256_matches_reference(mid_models, attn):
    """The paper's view: 16x16 grid (64 image tokens), sequence padded to 256 tokens, pad rows zero."""
    mid_models.text_encoder.set_attn_implementation(attn)
    try:
        fast = FastTextEncoderRunner(mid_models, 3, te_size=256)
        exact = TextEncoderRunner(mid_models, te_size=256)
        assert fast.grid == (1, 16, 16) and fast.n_tokens == 64
        frames = smooth_frames(256, seed=5)
        lengths = set()
        for prompt in ("oil painting", "make it look like a lego city at sunset"):
            ref = reference(mid_models, prompt, frames, te_size=256)
            ours = fast.encode(prompt, fast.prepare_images(frames), 3)
            mask = exact.text_mask(prompt)
            real = int(mask.sum())
            assert ref.shape == ours.shape == (3, 256 - mid_models.edit_prefix_len, 128)
            assert torch.equal(fast.text_mask(prompt), mask) and bool(mask[0, :real].all())
            assert fast.output_shape(prompt) == tuple(ours.shape[1:])
            assert (ours - ref).abs().max() <= TOL, (attn, prompt, (ours - ref).abs().max())
            assert not ref[:, real:].any() and not ours[:, real:].any()  # pad rows: zeros
            assert (ours[0, :real] - ours[1, :real]).abs().max() > 1e-3
            lengths.add(real)
        assert len(lengths) == 2  # two prompt lengths, one padded output length
        with torch.no_grad():  # the padded output keeps the forward one graph
            explain = torch._dynamo.explain(fast._forward)(fast.prepare_images(frames))
        assert explain.graph_count == 1 and explain.graph_break_count == 0, explain.break_reasons
        torch._dynamo.reset()
    finally:
        mid_models.text_encoder.set_attn_implementation("sdpa")


@pytest.mark.parametrize("te_size", [512, 256])
def test_normed_features_match_the_models_last_hidden_state(mid_models, te_size):
    """A model trained on the normed output: both runners return the library's ``last_hidden_state``
    (the final norm applied before the pad rows are zeroed), not DreamLite's pre-norm features."""
    normed = dataclasses.replace(mid_models, te_features="normed")
    fast, exact = FastTextEncoderRunner(normed, 2, te_size=te_size), TextEncoderRunner(normed, te_size=te_size)
    frames = smooth_frames(te_size, seed=2)[:2]
    images = exact.prepare_images(frames)
    text = {k: v.expand(2, -1) for k, v in exact.text_inputs("oil painting").items()}
    with torch.no_grad():
        lib = normed.text_encoder.model(**text, **images).last_hidden_state[:, normed.edit_prefix_len:]
    if te_size == 256:
        lib = lib * exact.text_mask("oil painting")[..., None]
    ref = exact.encode("oil painting", images, 2)
    ours = fast.encode("oil painting", fast.prepare_images(frames), 2)
    assert (ref - lib).abs().max() <= 1e-5 and (ours - lib).abs().max() <= TOL
    prenorm = reference(mid_models, "oil painting", frames, te_size=te_size)
    assert (ours - prenorm).abs().max() > 1e-1  # the two conventions differ: this comparison can fail


def test_te_size_256_resize_approximates_bilinear(tiny_models):
    fast = FastTextEncoderRunner(tiny_models, 3, te_size=256)
    frames = smooth_frames(64) + smooth_frames(512, n=1)
    for group in (frames[:3], frames[3:]):  # upscale 64 -> 256 and downscale 512 -> 256
        ours = fast.resize(fast.prepare_images(group)).permute(0, 2, 3, 1).numpy().astype(int)
        pil = np.stack([np.asarray(Image.fromarray(f).resize((256, 256), Image.BILINEAR)) for f in group]).astype(int)
        assert np.abs(ours - pil).mean() < 1.0
    # the device resize then feeds the same model path as the processor on those pixels
    host = fast.prepare_images(smooth_frames(64))
    resized = [f for f in fast.resize(host).permute(0, 2, 3, 1).numpy()]
    ref = reference(tiny_models, "oil painting", resized, 256)
    assert (fast.encode("oil painting", host, 3) - ref).abs().max() <= TOL


def test_encode_matches_reference_resize_path(tiny_models):
    """Working size 64: the device resize feeds the same model path as the processor on those pixels."""
    fast = FastTextEncoderRunner(tiny_models, 3)
    host = fast.prepare_images(smooth_frames(64))
    ours = fast.encode("oil painting", host, 3)
    resized = [f for f in fast.resize(host).permute(0, 2, 3, 1).numpy()]
    ref = reference(tiny_models, "oil painting", resized)
    assert (ours - ref).abs().max() <= TOL


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_prefix_cache_mid_config(mid_models, attn):
    """Prefix K/V cache + deepstack (3 layers) + position-grid resampling on a deeper random model."""
    mid_models.text_encoder.set_attn_implementation(attn)
    try:
        fast = FastTextEncoderRunner(mid_models, 3)
        frames = smooth_frames(512, seed=3)
        for prompt in ("oil painting", "snowy winter night"):
            full = mid_models.text_encoder.model  # uncached: last_hidden_state[:, 64:]
            ref = reference(mid_models, prompt, frames)
            ours = fast.encode(prompt, fast.prepare_images(frames), 3)
            assert full.config.vision_config.deepstack_visual_indexes == [0, 1, 3]
            assert (ours - ref).abs().max() <= TOL, (attn, prompt, (ours - ref).abs().max())
        # a single frame (the engine's te_batch_one) works with the same constants
        one = fast.encode("oil painting", fast.prepare_images(frames[:1]), 1)
        assert (one - reference(mid_models, "oil painting", frames[:1])).abs().max() <= TOL
    finally:
        mid_models.text_encoder.set_attn_implementation("sdpa")


def test_prefix_kv_is_stateless():
    k, v = [torch.randn(1, 2, 4, 8)], [torch.randn(1, 2, 4, 8)]
    cache = _PrefixKV(k, v)
    nk, nv = torch.randn(3, 2, 5, 8), torch.randn(3, 2, 5, 8)
    for _ in range(2):
        ck, cv = cache.update(nk, nv, 0)
        assert ck.shape == (3, 2, 9, 8) and torch.equal(ck[2, :, :4], k[0][0]) and torch.equal(cv[:, :, 4:], nv)


def test_compile_fullgraph_no_breaks_no_recompiles(tiny_models):
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    fast = FastTextEncoderRunner(tiny_models, 3)
    fast.set_prompt("oil painting")
    a, b = (torch.from_numpy(np.stack(smooth_frames(512, seed=s))) for s in (0, 9))
    with torch.no_grad():
        explain = torch._dynamo.explain(fast._forward)(a)
        assert explain.graph_count == 1 and explain.graph_break_count == 0, explain.break_reasons
        eager_a, eager_b = fast._forward(a), fast._forward(b)
    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")
    compile_te(fast, "reduce-overhead", backend=counter)  # CPU: no CUDA graph, compiled forward only
    assert fast.new_graph is None and not fast.graphs
    out_a = fast.encode("oil painting", a, 3)
    out_b = fast.encode("oil painting", b, 3)  # new frames: no recompile
    assert counter.frame_count == 1
    assert (out_a - eager_a).abs().max() <= 1e-5 and (out_b - eager_b).abs().max() <= 1e-5
    out_c = fast.encode("pencil sketch", b, 3)  # same token count (357): constants updated in place
    assert counter.frame_count == 1
    assert (out_c - reference(tiny_models, "pencil sketch", smooth_frames(512, seed=9))).abs().max() <= TOL
    fast.encode("watercolor", b, 3)  # 356 tokens: one recompile per new prompt length
    assert counter.frame_count == 2
    fast.encode("cartoon", a, 3)  # 356 again
    assert counter.frame_count == 2
    torch._dynamo.reset()


def test_a_graph_per_batch_size_each_captured_once(tiny_models):
    """The TE batch of a multi-stream tick changes with the streams ready (1, 2, 4, ...): each size keeps its own
    graph, so going back to a size replays it (one graph re-captured at every change stalled the launches)."""
    from streamedit.accel.graphs import StaticGraph

    fast = FastTextEncoderRunner(tiny_models, 4)
    frames = torch.from_numpy(np.stack(smooth_frames(512, n=4)))
    with torch.no_grad():
        eager = {b: fast.encode("oil painting", frames, b) for b in (1, 2, 4)}
    fast.new_graph = lambda: StaticGraph(fast.forward_fn, "cpu", name="te")  # compile_te's, on CPU (no capture)
    for b in (1, 2, 1, 4, 2, 1, 4):
        assert torch.equal(fast.encode("oil painting", frames, b), eager[b])
    assert sorted(fast.graphs) == [1, 2, 4] and all(g.captures == 1 for g in fast.graphs.values())
    fast.release()
    assert not fast.graphs


def test_fp8_path(tiny_models):
    """FP8 is an approximation for Hopper; here only its shapes/plumbing and rough accuracy (CPU _scaled_mm)."""
    from streamedit.text.fast import Fp8Linear

    fast = FastTextEncoderRunner(tiny_models, 3, fp8=True)
    n_fp8 = sum(isinstance(m, Fp8Linear) for m in [*fast.visual.modules(), *fast.lm.modules()])
    assert n_fp8 == 2 * 4 + 2 * 7  # vision qkv/proj/fc1/fc2, decoder q/k/v/o/gate/up/down
    assert not any(isinstance(m, Fp8Linear) for m in tiny_models.text_encoder.modules())  # shared model untouched
    frames = smooth_frames(512)
    ref = reference(tiny_models, "oil painting", frames)
    ours = fast.encode("oil painting", fast.prepare_images(frames), 3)
    assert ours.shape == ref.shape
    assert (ours - ref).norm() / ref.norm() < 0.1
    with torch.no_grad():
        explain = torch._dynamo.explain(fast._forward)(fast.prepare_images(frames))
    assert explain.graph_count == 1 and explain.graph_break_count == 0
    torch._dynamo.reset()


@pytest.mark.parametrize("size,te_batch_one,te_size", [(512, False, 512), (64, True, 512), (256, False, 256)])
def test_engine_te_fast_flag(tiny_models, size, te_batch_one, te_size):
    from streamedit import EngineConfig, StreamEngine

    frames = smooth_frames(size, n=3)

    def run(**kw):
        cfg = EngineConfig(prompt="oil painting", batch_size=2, size=size, seed=3, te_batch_one=te_batch_one,
                           te_size=te_size, **kw)
        engine = StreamEngine(tiny_models, cfg)
        try:
            return list(engine.run(frames)), engine
        finally:
            engine.close()

    (base, _), (fast, engine) = run(), run(te_fast=True)
    assert isinstance(engine.te, FastTextEncoderRunner) and len(fast) == 3
    diff = max(np.abs(x.astype(int) - y).max() for x, y in zip(base, fast))
    if size == te_size:  # the TE input is the frame itself: same conditioning, same frames
        assert diff <= 1
    else:  # 64 -> 512 resize: bicubic vs LANCZOS changes the conditioning slightly (measured: 1 level)
        assert diff <= 4


@pytest.mark.parametrize("te_size", [512, 256])
def test_prompt_tokens_one_length_for_every_prompt(mid_models, te_size):
    """prompt_tokens (the multi-stream engine): every prompt at one sequence length, so a prompt change copies
    constants in place (no re-layout: no recompile, no re-capture); its own rows equal the unpadded runner's,
    the rest are zeros and masked; a prompt over the room is refused with a message, not in a batch."""
    from streamedit.errors import StreameditError

    plain = FastTextEncoderRunner(mid_models, 3, te_size=te_size)
    fixed = FastTextEncoderRunner(mid_models, 3, te_size=te_size, prompt_tokens=24)
    frames = fixed.prepare_images(smooth_frames(te_size, seed=3))
    prompts = ("oil painting", "make it look like a lego city at sunset", "pencil")
    outs, layouts, shapes = {}, set(), set()
    for prompt in prompts + prompts[:1]:
        ref = plain.encode(prompt, frames, 3)
        ours = fixed.encode(prompt, frames, 3)
        mask = fixed.text_mask(prompt)
        own = int(mask.sum())
        shapes.add(tuple(ours.shape))
        assert mask.shape == (1, ours.shape[1]) and bool(mask[0, :own].all()) and own < ours.shape[1]
        assert (ours[:, :own] - ref[:, :own]).abs().max() <= TOL, prompt
        assert not ours[:, own:].any()  # pad rows: zeros
        assert fixed.output_shape(prompt) == tuple(ours.shape[1:])
        if prompt in outs:  # back to a prompt seen before: its kept constants, the same output
            assert torch.equal(outs[prompt], ours)
        outs[prompt] = ours
        layouts.add(fixed._layout)
    assert len(shapes) == 1 and len(layouts) == 1  # one length; constants never re-allocated after the first
    assert len({int(fixed.text_mask(p).sum()) for p in prompts}) == 3
    from torch._dynamo.testing import CompileCounterWithBackend

    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")
    compile_te(fixed, "reduce-overhead", backend=counter)
    for prompt in prompts:  # three prompt lengths: one compile (the unpadded runner compiles per length)
        assert (fixed.encode(prompt, frames, 3) - outs[prompt]).abs().max() <= 1e-5
    assert counter.frame_count == 1
    torch._dynamo.reset()
    with pytest.raises(StreameditError, match="too long"):
        fixed.check_prompt("a very long instruction " * 8)
    fixed.check_prompt("watercolor")  # fits: nothing raised
    plain.check_prompt("a very long instruction " * 8)  # the unpadded runner takes any prompt


@pytest.mark.parametrize("te_size", [512, 256])
def test_mixed_prompts_one_call_equals_one_call_per_prompt(mid_models, te_size):
    """text/mixed.py: a batch whose rows have different prompts, in one call, gives each row what the
    one-prompt runner gives for that row's prompt and frame; the constants stay in place (no re-layout), a
    compiled runner compiles once for any mix, and a one-prompt call after a mixed one is that prompt's again."""
    from torch._dynamo.testing import CompileCounterWithBackend

    from streamedit.text.mixed import MixedPromptRunner

    one = FastTextEncoderRunner(mid_models, 4, te_size=te_size, prompt_tokens=24)
    mixed = MixedPromptRunner(mid_models, 4, prompt_tokens=24, te_size=te_size)
    frames = mixed.prepare_images(smooth_frames(te_size, n=4, seed=5))
    p = ("oil painting", "make it look like a lego city at sunset", "pencil")
    mixes = [[p[0], p[1], p[2], p[1]], [p[2], p[0]], [p[1], p[1], p[0]]]

    def per_row(prompts):
        return torch.cat([one.encode(q, frames[r:r + 1], 1) for r, q in enumerate(prompts)])

    assert mixed.can_mix(list(p))
    expected, layouts = [per_row(m) for m in mixes], set()
    for m, ref in zip(mixes, expected):
        out = mixed.encode_rows(m, frames, 4)[:len(m)]
        assert (out - ref).abs().max() <= TOL, m
        layouts.add(mixed._layout)
    assert len(layouts) == 1
    solo = mixed.encode(p[0], frames, 4)  # every row back to one prompt
    assert (solo - one.encode(p[0], frames, 4)).abs().max() <= TOL
    with pytest.raises(ValueError, match="prompts for a batch"):
        mixed.encode_rows(list(p) * 2, frames, 4)
    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")
    compile_te(mixed, "reduce-overhead", backend=counter)
    for m, ref in zip(mixes, expected):
        assert (mixed.encode_rows(m, frames, 4)[:len(m)] - ref).abs().max() <= TOL
    assert counter.frame_count == 1
    torch._dynamo.reset()
