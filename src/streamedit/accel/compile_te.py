"""How the fast text encoder is compiled: its static forward whole, and a CUDA graph of it per batch size.

:func:`compile_te` (engine ``compile`` with ``te_fast``, called by engine/build.py) takes a
:class:`~streamedit.text.fast.FastTextEncoderRunner`, whose sync-free, static-shape forward is written to
be compiled, and installs the compiled forward (``runner.forward_fn``) and the maker of its graphs (``runner.new_graph``; one
per batch size, in ``runner.graphs``), which its ``encode`` then calls.
"""

from __future__ import annotations

from .compile_cache import compiled
from .graphs import StaticGraph, inductor_mode, wants_graph


def compile_te(runner, mode: str | None = "max-autotune-no-cudagraphs", backend: str = "inductor",
               cache_key: str | None = None, **options):
    """Wrap the runner's static forward in ``torch.compile(fullgraph=True, dynamic=False)``; returns ``runner``.

    ``mode="reduce-overhead"`` / ``"max-autotune"`` on CUDA: inductor without its cudagraph trees
    (``default`` / ``max-autotune-no-cudagraphs``) plus a CUDA graph per batch size captured by
    :class:`~streamedit.accel.graphs.StaticGraph`, each with a persistent input buffer (each batch's pixels
    are copied into it, then the graph replays on the current stream) and a static output that
    is cloned. cudagraph trees are avoided on purpose: they share one memory pool and step
    counter per device with the compiled U-Net, assume a single stream, and the engine runs the
    TE on a side stream concurrently with the U-Net.

    Recompiles: none per batch. A new prompt with the same token count updates the constants in
    place (no recompile, graph stays valid); a new token count, batch size or working size gives
    one recompile (dynamo shape guards); a new batch size a graph of its own, kept beside the others (a
    multi-stream engine's TE batch changes from tick to tick), a new token count a re-capture.

    ``cache_key`` (the engine's :func:`compile_cache.artifact_key`): the compiled forward is saved
    whole per (batch, prompt length) and the next process loads it without tracing
    (:class:`compile_cache.Precompiled`).
    """
    graph = wants_graph(mode, runner.device)
    if backend == "inductor":
        mode = options.pop("mode", inductor_mode(mode))
    runner.forward_fn = compiled(runner._forward, mode, backend, cache_key, "te", fullgraph=True, dynamic=False,
                                 variant=lambda: (runner.span, tuple(runner.c["cos"].shape), runner.n_pad), **options)
    runner.new_graph = (lambda: StaticGraph(runner.forward_fn, runner.device, name="te")) if graph else None
    runner.graphs = {}
    return runner
