"""accel/compile_main.py's CUDA-graph path on CPU: a StaticGraph runs its function on static buffers off CUDA,
so the graphs compile_denoiser makes, the multi-stream engine's per-bucket copies (own_graphs) and their
release can be checked here against the eager denoiser."""

import pytest
import torch

from streamedit.accel import compile_main
from streamedit.accel.graphs import StaticGraph
from streamedit.diffusion.denoiser import Denoiser


@pytest.fixture()
def graphed(tiny_models, monkeypatch):
    """A denoiser compiled the way the engine compiles it on CUDA (``reduce-overhead``: one StaticGraph of
    the fused main function, one of the VAE encode), on CPU."""
    monkeypatch.setattr(compile_main, "wants_graph", lambda mode, device: True)
    torch._dynamo.reset()
    yield compile_main.compile_denoiser(Denoiser(tiny_models, 1, 64), "reduce-overhead", backend="aot_eager")
    torch._dynamo.reset()


def inputs(batch: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    frames = torch.randint(0, 256, (batch, 64, 64, 3), generator=gen, dtype=torch.uint8)
    return frames, torch.randn(batch, 4, 8, 8, generator=gen), torch.randn(batch, 300, 64, generator=gen)


def test_own_graphs_share_the_compiled_functions_and_keep_their_own_captures(tiny_models, graphed):
    den = graphed
    assert isinstance(den.fused, StaticGraph) and isinstance(den.encode_fn, compile_main.GraphCopy)
    assert den.vae is not tiny_models.vae  # the channels_last copy
    one, two = compile_main.own_graphs(den), compile_main.own_graphs(den)
    assert one.fused is not two.fused and one.fused.fn is two.fused.fn is den.fused.fn
    assert one.encode_fn.graph is not two.encode_fn.graph
    assert one.encode_fn.graph.fn is two.encode_fn.graph.fn is den.encode_fn.graph.fn
    eager = Denoiser(tiny_models, 1, 64)
    for twin, batch in ((one, 1), (two, 2), (one, 1), (two, 2)):  # alternating sizes: no re-capture
        frames, noise, embeds = inputs(batch, seed=batch)
        source = twin.encode(frames)
        assert (source - eager.encode(frames)).abs().max() < 1e-4
        (out, latents), (ref, ref_latents) = twin.fused(noise, source, embeds), eager.generate(noise, source, embeds)
        assert out.shape == ref.shape and int((out.int() - ref.int()).abs().max()) <= 1
        assert torch.allclose(latents, ref_latents, atol=1e-4)
    assert one.fused.captures == two.fused.captures == 1
    assert one.encode_fn.graph.captures == two.encode_fn.graph.captures == 1
    handed_out = one.encode(inputs(1, seed=1)[0])  # a copy: the next replay overwrites the graph's output
    assert handed_out is not one.encode_fn.graph._out and torch.equal(handed_out, one.encode_fn.graph._out)


def test_release_graphs_drops_one_copys_graphs_only(graphed):
    one, two = compile_main.own_graphs(graphed), compile_main.own_graphs(graphed)
    for twin in (one, two):
        frames, noise, embeds = inputs(1, seed=0)
        twin.fused(noise, twin.encode(frames), embeds)
    compile_main.release_graphs(one)
    assert one.fused._sig is None and one.encode_fn.graph._sig is None and not one.fused._inputs
    assert two.fused._sig is not None and two.encode_fn.graph._sig is not None
    frames, noise, embeds = inputs(1, seed=0)
    one.fused(noise, one.encode(frames), embeds)  # a later call captures again
    assert one.fused.captures == 2 and two.fused.captures == 1
