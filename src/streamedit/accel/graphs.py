"""Compile helpers shared by the TE, the VAE and the denoiser: modes, and CUDA graphs on any stream.

torch.compile's own CUDA graphs (``mode="reduce-overhead"``, cudagraph trees) keep one memory pool
and one generation counter per device and assume the graphs replay on one stream. The engine's
compiled functions (the fast TE and the VAE encode on the side stream, U-Net + VAE decode on the
main one) are compiled *without* them (:func:`inductor_mode`) and captured here instead, by
:class:`StaticGraph`, into a plain ``torch.cuda.CUDAGraph`` that replays on whatever stream is
current at the call. Only the paper's recipe (U-Net compiled alone, the ``reference`` bench row)
still uses cudagraph trees.

Lifetimes (issue 23: ``bench --rows best,reference`` died with ``unspecified launch failure``):
cuBLAS and cuBLASLt keep one workspace per (handle, stream), allocated by the caching allocator at
the first matmul on that stream and kept in a process-wide map. A capture bakes the workspace's
address into its graph. Every capture here runs on the one stream ``torch.cuda.graph`` captures on
by default, so before this the first matmul captured in the process put that workspace in *its*
graph's private pool and every later graph (of any engine) reused it; cudagraph trees (the
``reference`` row) empty the map before and after each warm-up and recording, the first engine's
pool became free once its graphs were gone, the next ``empty_cache`` returned it to the driver,
and the next engine's graph replayed a GEMM into unmapped memory. :func:`capture_guard` therefore
empties the map before and after each capture, as cudagraph trees do: each graph gets a workspace
in its own pool, which lives exactly as long as the graph. It also holds the capture lock and
pauses Python's garbage collector for the capture, so no destructor of another engine's tensors
or graphs runs inside it; :func:`release_memory` (engine teardown) runs the collector and empties
the allocator's cache under the same lock.
"""

from __future__ import annotations

import contextlib
import gc
import threading
import time

import torch

# "<name>:warmup1|warmup2|...|capture" -> seconds of each StaticGraph's first captures in this process
# (device-synchronised; the startup probe reports them)
CAPTURE_SECONDS: dict[str, float] = {}
# one capture at a time: torch.cuda.graph() starts with a device sync and empty_cache(), which must not
# run while another thread captures (the engine captures the main graph on a worker, compile_main.warm_main);
# engine teardown (release_memory) takes it too
_CAPTURE_LOCK = threading.Lock()


def _clear_blas_workspaces() -> None:
    """Drop cuBLAS/cuBLASLt's per-(handle, stream) workspaces: the next matmul allocates a new one."""
    clear = getattr(torch._C, "_cuda_clearCublasWorkspaces", None)
    if clear is not None:
        clear()


@contextlib.contextmanager
def capture_guard():
    """Around one graph capture: the capture lock, the garbage collector paused (no foreign destructor
    inside the capture) and the cuBLAS workspaces emptied before and after (see the module docstring).

    Emptying after the capture leaves the graph's workspace a free block of the graph's own pool, as
    cudagraph trees leave theirs: nothing else allocates from that pool, so it stays the graph's
    scratch memory until the graph is dropped, and then goes with the pool.
    """
    with _CAPTURE_LOCK:
        enabled = gc.isenabled()
        gc.disable()
        try:
            _clear_blas_workspaces()
            yield
        finally:
            _clear_blas_workspaces()
            if enabled:
                gc.enable()


def release_memory(device) -> None:
    """Collect garbage, then (CUDA) synchronize and return cached memory, with no capture in flight."""
    with _CAPTURE_LOCK:
        gc.collect()
        if torch.device(device).type == "cuda" and torch.cuda.is_initialized():
            torch.cuda.synchronize(device)
            torch.cuda.empty_cache()
            host_empty = getattr(torch._C, "_host_emptyCache", None)  # cached pinned blocks (torch >= 2.5)
            if host_empty is not None:
                host_empty()


# torch.compile modes that include cudagraph trees -> the same inductor mode without them
CUDA_GRAPH_MODES = {"reduce-overhead": "default", "max-autotune": "max-autotune-no-cudagraphs"}


def inductor_mode(mode: str | None) -> str | None:
    """The inductor mode to use when the CUDA graph is captured by :class:`StaticGraph`."""
    return CUDA_GRAPH_MODES.get(mode, mode)


def wants_graph(mode: str | None, device: torch.device) -> bool:
    """True when ``mode`` asks for CUDA graphs and there is a CUDA device to capture on."""
    return mode in CUDA_GRAPH_MODES and torch.device(device).type == "cuda"


def compile_fn(fn, mode: str | None, backend: str = "inductor", inductor: dict | None = None, **kwargs):
    """``torch.compile`` with ``mode`` passed only to inductor (other backends have no modes).

    ``inductor``: inductor options on top of the mode's (torch.compile takes a mode or options, not both).
    """
    if backend == "inductor" and inductor:
        kwargs["options"] = {**mode_options(mode), **inductor}
    elif backend == "inductor" and mode is not None:
        kwargs["mode"] = mode
    return torch.compile(fn, backend=backend, **kwargs)


def mode_options(mode: str | None) -> dict:
    """The inductor options a torch.compile ``mode`` stands for ({} for none / "default")."""
    from torch._inductor import list_mode_options

    return dict(list_mode_options(mode)) if mode else {}


# Inductor options for the conv nets (U-Net + decode, VAE encode). GroupNorm over channels_last
# activations as one reduction per (image, group): inductor's default split reduction reads across the
# channels in its first pass. H100, GroupNorm + SiLU of (8, 512, 64, 128): 0.115 against 0.330 ms
# (docs/benchmarks.md, eleventh session).
CONV_NET_INDUCTOR = {"split_reductions": False}


class StaticGraph:
    """``fn(*inputs)`` replayed from one CUDA graph per input signature (shapes, dtypes, ``key``).

    Each call copies the inputs into persistent buffers (host pinned or device tensors; the copy is
    queued on the current stream), replays the graph on the current stream and returns the graph's
    static outputs. The next call overwrites them: callers copy what they keep beyond it. A new
    signature (or ``key``: anything else the capture baked in) drops the old graph and captures a
    new one: two warm-up runs on a fresh stream (compilation, autotuning, allocator), then capture
    in ``thread_local`` mode (the engine's prefetch thread may pin memory meanwhile).

    Off CUDA there is nothing to capture: ``fn`` runs on the same static buffers, so the call
    semantics (buffers, overwritten outputs, re-captures counted in ``captures``) are the same.
    """

    def __init__(self, fn, device, warmup: int = 2, name: str = "graph"):
        self.fn, self.device, self.warmup, self.name = fn, torch.device(device), warmup, name
        self.captures = 0
        self._sig = self._graph = self._out = None
        self._inputs: list[torch.Tensor] = []

    def __reduce__(self):  # pickled as its name only (see compile_cache.Precompiled.__reduce__)
        return (str, ("<StaticGraph>",))

    def release(self) -> None:
        """Drop the graph (its private memory pool goes with it), then the static buffers it read and
        wrote. The next call captures again. The caller makes sure no replay is still queued."""
        self._graph = None
        self._out = None
        self._inputs = []
        self._sig = None

    def __call__(self, *inputs: torch.Tensor, key=()):
        sig = (tuple((tuple(x.shape), x.dtype) for x in inputs), key)
        if sig != self._sig:
            self._capture(inputs, sig)
        else:
            for buf, x in zip(self._inputs, inputs):
                buf.copy_(x, non_blocking=True)
        if self._graph is not None:
            self._graph.replay()
        else:
            self._out = self.fn(*self._inputs)
        return self._out

    def _capture(self, inputs, sig) -> None:
        self._graph = self._out = None  # release the previous graph (and its pool) first
        self._inputs = [torch.empty(x.shape, dtype=x.dtype, device=self.device) for x in inputs]
        for buf, x in zip(self._inputs, inputs):
            buf.copy_(x, non_blocking=True)
        self._sig = sig
        self.captures += 1
        if self.device.type != "cuda":
            return
        current = torch.cuda.current_stream(self.device)
        warm = torch.cuda.Stream(self.device)
        warm.wait_stream(current)
        with torch.cuda.stream(warm):
            for i in range(self.warmup):
                with self._timed(f"warmup{i + 1}", warm):
                    self.fn(*self._inputs)
        current.wait_stream(warm)
        graph = torch.cuda.CUDAGraph()
        with (capture_guard(), self._timed("capture", current),
              torch.cuda.graph(graph, capture_error_mode="thread_local")):
            self._out = self.fn(*self._inputs)
        self._graph = graph

    @contextlib.contextmanager
    def _timed(self, phase: str, stream):
        """Add the phase's seconds (host work and the stream's queued work) to :data:`CAPTURE_SECONDS`."""
        t0 = time.perf_counter()
        yield
        stream.synchronize()
        key = f"{self.name}:{phase}"
        CAPTURE_SECONDS[key] = CAPTURE_SECONDS.get(key, 0.0) + time.perf_counter() - t0
