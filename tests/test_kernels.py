"""Exact kernel substitutions (streamedit.accel.kernels) against the library modules they stand in for.

The CUDA kernels themselves (flash attention, cuBLASLt's GELU epilogue, cuDNN's fused convolutions)
are checked on the GPU by scripts/gpu_kernel_probe.py; here the CPU paths, the plumbing around the
CUDA ones and the assumption each relies on.
"""

import pytest
import torch
import torch.nn.functional as F
from test_te_fast import smooth_frames
from torch.nn.attention.bias import causal_lower_right

from streamedit.accel import kernels
from streamedit.accel.kernels import FusedTinyBlock, fuse_tiny_vae, prefix_causal_attention
from streamedit.text.fast import FastTextEncoderRunner


def test_fused_tiny_vae_equals_library_vae_eager_and_compiled(tiny_models):
    vae = tiny_models.vae
    fused = fuse_tiny_vae(vae)
    kinds = [type(m) for m in fused.modules()]
    assert kinds.count(FusedTinyBlock) >= 4  # something was fused, in the encoder and the decoder
    for part in ("encoder", "decoder"):
        assert all(type(m).__name__ != "AutoencoderTinyBlock" for m in getattr(fused, part).layers)
        assert any(type(m).__name__ == "AutoencoderTinyBlock" for m in getattr(vae, part).layers)  # untouched
    torch.manual_seed(0)
    image = torch.rand(2, 3, 64, 64) * 2 - 1
    latents = torch.randn(2, vae.config.latent_channels, 8, 8)
    with torch.no_grad():
        ref_enc, ref_dec = vae.encode(image).latents, vae.decode(latents).sample
        assert torch.allclose(fused.encode(image).latents, ref_enc, atol=1e-5)
        assert torch.allclose(fused.decode(latents).sample, ref_dec, atol=1e-5)
        compiled = torch.compile(lambda z: fused.decode(z).sample, fullgraph=True)
        assert torch.allclose(compiled(latents), ref_dec, atol=1e-4)


def test_prefix_mask_is_the_bottom_right_causal_set(tiny_models):
    """Flash's is_causal (Lq < Lk) keeps exactly the keys the library's mask for the cached suffix keeps."""
    fast = FastTextEncoderRunner(tiny_models, 2)
    fast.set_prompt("oil painting")
    mask = fast.c["mask"]
    lq, lk = mask.shape[-2:]
    allowed = mask[0, 0] if mask.dtype == torch.bool else mask[0, 0] == 0
    assert lk - lq == tiny_models.edit_prefix_len
    assert torch.equal(allowed, causal_lower_right(lq, lk)._materialize("cpu"))


def test_prefix_causal_attention_layout_and_groups(monkeypatch):
    """The flash branch's plumbing (layout, grouped K/V) with flash's semantics on CPU; the fallback alone."""
    torch.manual_seed(0)
    q = torch.randn(2, 4, 5, 8)
    k, v = torch.randn(2, 2, 9, 8), torch.randn(2, 2, 9, 8)
    ref = F.scaled_dot_product_attention(q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1),
                                         attn_mask=causal_lower_right(5, 9)._materialize("cpu"), scale=0.3)
    ref = ref.transpose(1, 2)
    module = type("Attn", (), {"num_key_value_groups": 2, "is_causal": True})()
    mask = causal_lower_right(5, 9)._materialize("cpu")[None, None]
    out, _ = prefix_causal_attention(module, q, k, v, mask, scaling=0.3)  # CPU: transformers' sdpa + mask
    assert torch.allclose(out, ref, atol=1e-5)

    def flash_semantics(q_, k_, v_, dropout, is_causal, scale):  # what the CUDA op computes
        assert is_causal and dropout == 0.0
        groups = q_.shape[1] // k_.shape[1]
        o = F.scaled_dot_product_attention(q_, k_.repeat_interleave(groups, 1), v_.repeat_interleave(groups, 1),
                                           attn_mask=causal_lower_right(q_.shape[2], k_.shape[2]), scale=scale)
        return (o,)

    monkeypatch.setattr(kernels, "_flash_ok", lambda t: True)
    monkeypatch.setattr(kernels, "_flash_causal", flash_semantics)
    out, _ = prefix_causal_attention(module, q, k, v, None, scaling=0.3)
    assert out.shape == (2, 5, 4, 8) and out.is_contiguous()
    assert torch.allclose(out, ref, atol=1e-5)


def test_fast_te_with_and_without_fused_kernels(tiny_models):
    frames = smooth_frames(512, n=2)
    a = FastTextEncoderRunner(tiny_models, 2, fused_kernels=True)
    b = FastTextEncoderRunner(tiny_models, 2, fused_kernels=False)
    impls = {layer.self_attn.config._attn_implementation for layer in a.lm.layers}
    assert impls == {kernels.PREFIX_CAUSAL}
    assert tiny_models.text_encoder.config.text_config._attn_implementation != kernels.PREFIX_CAUSAL  # shared model
    with torch.no_grad():
        out_a = a.encode("oil painting", a.prepare_images(frames), 2)
        out_b = b.encode("oil painting", b.prepare_images(frames), 2)
    assert torch.allclose(out_a, out_b, atol=1e-5)


@pytest.mark.parametrize("bias", [True, False])
def test_linear_gelu_tanh_cpu_path(bias):
    fc = torch.nn.Linear(16, 24, bias=bias)
    x = torch.randn(3, 5, 16)
    assert torch.allclose(kernels.linear_gelu_tanh(x, fc), F.gelu(fc(x), approximate="tanh"))  # not erf
