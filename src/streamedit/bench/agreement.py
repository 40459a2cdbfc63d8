"""Agreement of a bench row with an fp32 eager run of the same config, on the same frames (``bench --agreement``).

Decoded pixels of random weights are almost black on the real-size model, so output frames cannot show that a
fast row computes what the eager one does. The TE embeddings and the final latents do carry signal. Each row's
engine records them for its first :data:`PROBE_BATCHES` batches (engine/probe.py; the untimed pre-warm batches,
so nothing is added to the timed run), then, once every row is timed:

* the **reference**: the row's config with its approximations undone (:data:`APPROXIMATIONS`) and everything
  eager (:data:`EAGER`: upstream's TE runner, nothing compiled), on float32 copies of the models and of the
  row's LLLite adapter, TF32 off, fed the same frames and the row's own starting noise;
* the **floor**: the same eager config in bf16 (the models' dtype, or bf16 copies of float32 models), same
  frames and noise: how far plain bf16 arithmetic already sits from the reference.

Per row: relative L2 ``|row - ref| / |ref|`` and cosine (per token for the TE, per frame for the latents) of
the TE output and of the final latents, the same for the floor, and ``exact``: both of the row's relative L2s
within :data:`EXACT_FACTOR` x the floor's. Measured after all rows, so the float32 copies (~4 bytes a
parameter) never sit in GPU memory while a row is timed.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import time

import torch
import torch.nn.functional as F
from torch import nn

from ..engine.probe import EngineProbe
from ..engine.stream import StreamEngine

PROBE_BATCHES = 2  # batches compared per row: bounded, and more than one (the TE cache, cond and flow state)
# A row is exact when its relative L2 (TE and latents) is at most this many times the eager bf16 run's. Two
# bf16 implementations that round in different places (fusions, reduction order, the fast TE's kernels) each
# sit about one floor from the fp32 reference, with errors that do not cancel: 2x leaves room for that and
# nothing more. Approximations sit far above it (the FP8 TE: ~20x on the H100 in its TE output, docs/benchmarks.md).
EXACT_FACTOR = 2.0
APPROXIMATIONS = {"te_batch_one": False, "te_refresh_every": 1, "te_fp8": False, "skip_similar": None}
EAGER = {"te_fast": False, "compile": False, "compile_vae": False, "pipeline": False, "low_latency": False,
         "main_priority": False, "profile": False}
REFERENCE = ("fp32 eager, same config without approximations (te_refresh_every=1, te_batch_one, te_fp8, "
             "skip_similar off), upstream's TE runner, nothing compiled")


@dataclasses.dataclass
class PendingRow:
    """What a timed row leaves for its agreement measurement."""
    config: object  # the row's EngineConfig (frame_size set)
    frames: list  # the frames its engine saw first (the probe's batches)
    probe: EngineProbe
    adapter: object = None  # a host copy of the row's LLLite adapter (None: no adapter)


def host_adapter(adapter):
    """A host copy of an engine's adapter (after the engine closed: its buffers are released)."""
    return None if adapter is None else copy.deepcopy(adapter).cpu()


def reference_config(config, adapter, dtype, device):
    """The eager config of a reference or floor run: ``adapter`` (a host copy) cast to ``dtype`` on ``device``."""
    lllite = None if adapter is None else copy.deepcopy(adapter).to(device=device, dtype=dtype)
    return dataclasses.replace(config, **APPROXIMATIONS, **EAGER, lllite=lllite)


def cast_models(models, dtype, cache: dict):
    """``models`` with float copies of its three networks in ``dtype`` (itself when already so), made once."""
    if models.dtype == dtype:
        return models
    if dtype not in cache:
        # nn.Module.to: diffusers' own .to() warns about modules to keep in float32 (these models have none)
        nets = {k: nn.Module.to(copy.deepcopy(getattr(models, k)), dtype) for k in ("text_encoder", "vae", "unet")}
        cache[dtype] = dataclasses.replace(models, **nets, extras={})
    return cache[dtype]


@contextlib.contextmanager
def no_tf32():
    """A float32 reference means float32 matmuls and convolutions (cuDNN allows TF32 by default)."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def probe_run(models, config, frames, batches: int, noise=None) -> EngineProbe:
    """``batches`` batches of ``frames`` through a fresh engine of ``config``, recorded (``noise``: replayed)."""
    probe = EngineProbe(batches, noise=noise)
    with StreamEngine(models, config) as engine:
        engine.probe = probe
        engine.process(list(frames[: batches * config.batch_size]))
    return probe


def compare(x: torch.Tensor, ref: torch.Tensor, mask: torch.Tensor | None = None, per: str = "token") -> dict:
    """Relative L2 of ``x`` against ``ref`` and their cosine similarity (mean, min) per token (over the hidden
    dim) or per frame (over everything); ``mask`` (frames, tokens): only real tokens count."""
    x, ref = x.float(), ref.float()
    if mask is not None:
        keep = mask.bool()
        x, ref = x[keep], ref[keep]  # (real tokens, hidden)
    if per == "frame":
        x, ref = x.flatten(1), ref.flatten(1)
    cos = F.cosine_similarity(x, ref, dim=-1)
    return {"rel_l2": float((x - ref).norm() / ref.norm().clamp(min=1e-12)),
            "cosine": float(cos.mean()), "cosine_min": float(cos.min())}


def measure(models, row: PendingRow, casts: dict) -> dict:
    """The ``agreement`` field of one row (module docstring)."""
    t0 = time.perf_counter()
    cfg, probe = row.config, row.probe
    batches = len(probe.records)
    noise = [r.noise for r in sorted(probe.records, key=lambda r: r.index)]
    low = models.dtype if models.dtype != torch.float32 else torch.bfloat16
    runs = {}
    for name, dtype in (("reference", torch.float32), ("floor", low)):
        m = cast_models(models, dtype, casts)
        with no_tf32() if dtype == torch.float32 else contextlib.nullcontext():
            runs[name] = probe_run(m, reference_config(cfg, row.adapter, dtype, m.device), row.frames, batches,
                                   noise).stacked()
    ref_e, ref_mask, ref_lat = runs["reference"]

    def against_ref(got):
        embeds, _, latents = got
        return {"te": compare(embeds, ref_e, ref_mask), "latents": compare(latents, ref_lat, per="frame")}

    row_fig, floor = against_ref(probe.stacked()), against_ref(runs["floor"])
    ratio = {k: row_fig[k]["rel_l2"] / max(floor[k]["rel_l2"], 1e-12) for k in ("te", "latents")}
    exact = all(row_fig[k]["rel_l2"] <= EXACT_FACTOR * floor[k]["rel_l2"] + 1e-7 for k in ("te", "latents"))
    return {"reference": REFERENCE, "floor_dtype": str(low).removeprefix("torch."), "batches": batches,
            "frames": int(ref_lat.shape[0]), **row_fig, "floor": floor, "ratio_to_floor": ratio,
            "exact_factor": EXACT_FACTOR, "exact": exact, "seconds": time.perf_counter() - t0}


def measure_all(models, pending: dict, echo) -> dict:
    """``agreement`` for each pending row (name -> PendingRow); a failure is recorded, not raised."""
    casts, out = {}, {}
    try:
        for name, row in pending.items():
            try:
                out[name] = measure(models, row, casts)
            except Exception as exc:  # noqa: BLE001  (a long GPU run keeps its timings)
                out[name] = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"}
                echo(f"  {name}: agreement FAILED: {out[name]['error']}", err=True)
                continue
            a = out[name]
            echo(f"  {name}: agreement {'exact' if a['exact'] else 'NOT exact'} (rel L2 TE "
                 f"{a['te']['rel_l2']:.2e}, latents {a['latents']['rel_l2']:.2e}; floor "
                 f"{a['floor']['te']['rel_l2']:.2e}, {a['floor']['latents']['rel_l2']:.2e})", err=True)
    finally:
        casts.clear()  # the float copies go before anything else runs
        if models.device.type == "cuda":
            torch.cuda.empty_cache()
    return out
