"""How the denoiser is compiled: the main stream's one function, the VAE encode, their CUDA graphs.

:func:`compile_denoiser` (engine ``compile``/``compile_vae``, called by engine/build.py): the main stream's
whole work for a batch, U-Net x steps + VAE decode + uint8 conversion, becomes ONE compiled function
(:meth:`Denoiser.generate <streamedit.diffusion.denoiser.Denoiser.generate>`, installed as ``den.fused``),
and so does the side stream's VAE encode (uint8 -> [-1, 1] -> encoder, ``den.encode_fn``). With a
CUDA-graph mode (``reduce-overhead``) both are compiled without cudagraph trees and each is captured by
:class:`~streamedit.accel.graphs.StaticGraph` into one CUDA graph that replays on the stream that calls it
(on the H100 the main stream's graph took 55 ms beside the TE, against 58 ms as a cudagraph tree;
docs/benchmarks.md). With a cache key both are saved whole
(:class:`~streamedit.accel.compile_cache.Precompiled`) and the next process loads them untraced. The VAE
runs as a channels_last copy (shared per model, so the eager path and other engines keep the
original): TAESD is all convolutions, and the decoder's NHWC output is the uint8 frame layout.
The LLLite adapter's cond buffers are module buffers updated in place, so the compiled U-Net
reads their current contents at every call.

Also here: :func:`warm_main` (a warm start's first call and capture of the main graph on a worker
thread), :func:`own_graphs` (a copy with CUDA graphs of its own, per batch-size bucket of the multi-stream
engine) and :func:`release_graphs` (engine teardown). The functions take a
:class:`~streamedit.diffusion.denoiser.Denoiser` and fill its ``fused`` / ``decode_fn`` / ``encode_fn``;
the denoiser itself holds only the eager arithmetic (and the methods compiled here).
"""

from __future__ import annotations

import copy
from concurrent.futures import Future, ThreadPoolExecutor

import torch

from .compile_cache import Precompiled, compiled
from .graphs import (
    CONV_NET_INDUCTOR,
    StaticGraph,
    compile_fn,
    inductor_mode,
    wants_graph,
)
from .kernels import fuse_tiny_vae


class GraphCopy:
    """A :class:`StaticGraph` whose output is handed out as a copy: the next replay overwrites the graph's."""

    def __init__(self, graph: StaticGraph):
        self.graph = graph

    def __call__(self, *inputs: torch.Tensor) -> torch.Tensor:
        return self.graph(*inputs).clone()


def compile_denoiser(den, mode: str | None, backend: str = "inductor", unet: bool = True, vae: bool = True,
                     channels_last: bool = True, cache_key: str | None = None):
    """Compile the U-Net and/or the VAE of ``den`` (see the module docstring); returns ``den``. Both: one
    fused function.

    With both and a CUDA-graph mode, the fused function is compiled without cudagraph trees and
    captured by :class:`StaticGraph`, like the VAE encode: ``cache_key`` then saves both whole
    (:class:`Precompiled`), so the next process loads them without tracing.
    """
    if vae and channels_last:
        den.vae = channels_last_vae(den.models)
    graph = wants_graph(mode, den.models.device)
    static_mode = inductor_mode(mode) if graph else mode  # for what StaticGraph captures
    if unet and vae:
        fused = compiled(den.generate, static_mode, backend, cache_key, "main", inductor=CONV_NET_INDUCTOR)
        den.fused = StaticGraph(fused, den.models.device, name="main") if graph else fused
    elif unet:  # the paper's recipe: the U-Net alone, in cudagraph trees
        for t in (den.timesteps, den.time_ids, *den.dts):  # constant inputs: no copy into the trees
            torch._dynamo.mark_static_address(t)
        den.unet = compile_fn(den.unet, mode, backend)
    elif vae:
        den.decode_fn = compile_fn(den._decode_target, mode, backend)
    if vae:
        encode = compiled(den._encode_target, static_mode, backend, cache_key, "encode", inductor=CONV_NET_INDUCTOR)
        den.encode_fn = GraphCopy(StaticGraph(encode, den.models.device, name="encode")) if graph else encode
    return den


def own_graphs(den):
    """A copy of ``den`` sharing the compiled functions, with CUDA graphs of its own: the multi-stream engine
    keeps one per batch-size bucket, so alternating batch sizes replay their graphs instead of re-capturing
    (a :class:`StaticGraph` captures again whenever its input shapes change)."""
    twin = copy.copy(den)
    if isinstance(den.fused, StaticGraph):
        twin.fused = StaticGraph(den.fused.fn, den.fused.device, name=den.fused.name)
    if isinstance(den.encode_fn, GraphCopy):
        twin.encode_fn = GraphCopy(StaticGraph(den.encode_fn.graph.fn, den.encode_fn.graph.device, name="encode"))
    return twin


def release_graphs(den) -> None:
    """Drop the CUDA graphs of ``den``'s main and encode functions (and their static buffers); the compiled
    functions stay, a later call captures again. The caller makes sure no replay is still queued."""
    encode = den.encode_fn.graph if isinstance(den.encode_fn, GraphCopy) else None
    for graph in (den.fused, encode):
        if isinstance(graph, StaticGraph):
            graph.release()


def warm_main(den, batch: int, embeds_shape: tuple[int, int], masked: bool = False) -> Future | None:
    """Get ``den``'s main function ready for a first batch of ``batch`` frames while the caller goes on.

    For a warm start (engine, first batch): the saved function is loaded here, on the caller's
    thread (Python holding the GIL), and its first call and CUDA-graph capture run on a worker
    thread, which the caller joins (``.result()``) before the first batch's own call. That first
    call is cuDNN/cuBLAS set-up with the GIL released (4.0 s of a 29 s warm start on the H100,
    docs/benchmarks.md), so it overlaps what the caller loads next (the TE). None when there is
    nothing saved to load: a compile runs in the usual order, on one thread.
    """
    # a graph's inputs are its own contiguous buffers: the signature known here is the one it will
    # call with (a bare function would see the callers' strides: channels_last latents, expanded embeds)
    if not (isinstance(den.fused, StaticGraph) and isinstance(den.fused.fn, Precompiled)):
        return None
    fn = den.fused.fn
    device, dtype = den.models.device, den.models.dtype
    latents = (batch, den.models.vae.config.latent_channels, *den.latent_shape)
    inputs = (torch.zeros(latents, dtype=dtype, device=device), torch.zeros(latents, dtype=dtype, device=device),
              torch.zeros((batch, *embeds_shape), dtype=dtype, device=device))
    if masked:  # te_size 256: the text mask is the fourth input (long, like the TE's attention mask)
        inputs += (torch.ones((batch, embeds_shape[0]), dtype=torch.long, device=device),)
    if fn.prepare(*inputs) != "loaded":
        return None
    stream = None
    if device.type == "cuda":
        stream = torch.cuda.Stream(device)
        stream.wait_stream(torch.cuda.current_stream(device))  # the zeros
    worker = ThreadPoolExecutor(1, thread_name_prefix="streamedit-warm")
    modes = (torch.is_grad_enabled(), torch.is_inference_mode_enabled())  # thread-local, and guarded
    future = worker.submit(_first_call, den.fused, inputs, stream, modes)
    worker.shutdown(wait=False)
    return future


def _first_call(fn, inputs, stream, modes) -> None:
    """``fn(*inputs)`` once on ``stream`` (a StaticGraph: its warm-up and capture), finished on return."""
    grad, inference = modes
    with torch.set_grad_enabled(grad), torch.inference_mode(inference):
        if stream is None:
            fn(*inputs)
            return
        with torch.cuda.stream(stream):
            fn(*inputs)
        stream.synchronize()


def channels_last_vae(models):
    """A channels_last copy of the VAE, made once per model (TAESD: a few MB of weights).

    On CUDA its residual blocks run as cuDNN fused convolutions (:func:`streamedit.accel.kernels.fuse_tiny_vae`;
    the same sums, one pass over memory fewer each).
    """
    key = ("vae_channels_last", id(models.vae))
    if key not in models.extras:
        vae = copy.deepcopy(models.vae).to(memory_format=torch.channels_last)
        models.extras[key] = fuse_tiny_vae(vae) if models.device.type == "cuda" else vae
    return models.extras[key]
