"""Output of ``streamedit bench``: the comparison table, the PNG and the run's identity."""

from __future__ import annotations

import numpy as np

from ..errors import StreameditError
from ..telemetry import COMPONENTS


def _f(v, fmt="{:.1f}"):
    return "—" if v is None else fmt.format(v)


def format_table(results: list[dict]) -> str:
    comps = [c for c in COMPONENTS if any(c in r["component_ms_mean"] for r in results)]
    comps += sorted({c for r in results for c in r["component_ms_mean"]} - set(comps))
    skips = any(r.get("config", {}).get("skip_similar") is not None for r in results)
    agree = any("agreement" in r for r in results)
    head = ["row", "B", "fps", "keeps up", "ratio", "wall p50", "p95", "max", "lat p50", "p95"] + comps + \
           ["peak GiB", "TFLOP/s", "% peak"] + (["skipped fr", "skipped b"] if skips else []) + \
           (["exact (x floor)"] if agree else [])
    lines = []
    for r in results:
        w, lt, ms = r["batch_wall_ms"], r["latency_ms"], r["component_ms_mean"]
        lines.append([r["row"], str(r["batch"]), _f(r["fps"]), _keeps_up(r), _f(r["ratio"], "{:.2f}"),
                      _f(w["p50"]), _f(w["p95"]),
                      _f(w["max"]), _f(lt["p50"], "{:.0f}"), _f(lt["p95"], "{:.0f}")] +
                     [_f(ms.get(c)) for c in comps] +
                     [_f(r["peak_gpu_gib"], "{:.2f}"), _f(r["tflops"], "{:.3g}"), _f(r["pct_of_peak"])] +
                     ([str(r.get("skipped_frames", 0)), str(r.get("skipped_batches", 0))] if skips else []) +
                     ([_exact(r.get("agreement"))] if agree else []))
    widths = [max(len(x) for x in col) for col in zip(head, *lines)]
    out = ["  ".join(x.ljust(n) if i == 0 else x.rjust(n) for i, (x, n) in enumerate(zip(row, widths)))
           for row in [head] + lines]
    out += [f"  [{r['row']}] {n}" for r in results for n in r["notes"]]
    out += [f"  [{r['row']}] {_agreement_note(a)}" for r in results if (a := r.get("agreement"))]
    out += [f"  [{r['row']}] TE fp8 vs bf16: cosine mean {a['cosine_mean']:.5f}, min {a['cosine_min']:.5f}, "
            f"rel L2 {a['rel_l2']:.4f}" for r in results if (a := r.get("te_fp8_agreement"))]
    return "\n".join(out)


def _exact(a: dict | None) -> str:
    """The 'exact' column: yes/NO and the row's worse relative L2 (TE or latents) as a multiple of the floor's."""
    if a is None:
        return "—"
    if "error" in a:
        return "failed"
    return f"{'yes' if a['exact'] else 'NO'} {max(a['ratio_to_floor'].values()):.2g}x"


def _agreement_note(a: dict) -> str:
    if "error" in a:
        return f"agreement: failed ({a['error']})"
    f = a["floor"]
    return (f"vs fp32 eager ({a['frames']} frames): TE rel L2 {a['te']['rel_l2']:.2e} (floor {f['te']['rel_l2']:.2e}), "
            f"cos {a['te']['cosine']:.6f}; latents rel L2 {a['latents']['rel_l2']:.2e} (floor "
            f"{f['latents']['rel_l2']:.2e}), cos {a['latents']['cosine']:.6f}; exact = both <= "
            f"{a['exact_factor']:g}x the {a['floor_dtype']} eager floor")


def _keeps_up(r: dict) -> str:
    """Whether the row kept up with its simulated camera: "yes", "NO (30 fps source)", "—" (as fast as possible)."""
    if r.get("keeps_up") is None:
        return "—"
    return "yes" if r["keeps_up"] else f"NO ({r['source_fps']:g} fps source)"


def format_startup(res: dict) -> str:
    """The --startup result: seconds since launch for each phase, cold and warm, and the cache hits."""
    lines = ["launch  imports  models  engine  first frame  cache (FX graph / AOT autograd hits, misses)"]
    for name in ("cold", "warm"):
        r = res[name]
        c = r["cache"]
        lines.append(f"{name:<6}  {r['import_s']:7.1f}  {r['load_s']:6.1f}  {r['engine_s']:6.1f}  "
                     f"{r['first_frame_s']:11.1f}  {c.get('fxgraph_cache_hit', 0)}/{c.get('autograd_cache_hit', 0)} "
                     f"hits, {c.get('fxgraph_cache_miss', 0)}/{c.get('autograd_cache_miss', 0)} misses")
    lines.append(f"  (seconds since the process was launched; compile cache after both: {res['cache_mib']:.1f} MiB)")
    for name in ("cold", "warm"):  # a function not served precompiled (or not loaded) says why
        for fn, why in res[name].get("precompiled_fallbacks", {}).items():
            what = fn if fn.endswith("(compiled again)") else f"{fn} not precompiled (traced by torch.compile)"
            lines.append(f"  {name}: {what}: {why}")
    return "\n".join(lines)


def check_matplotlib():
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only: no display needed
        import matplotlib.pyplot as plt
    except ImportError:
        raise StreameditError("--plot needs matplotlib: pip install 'streamedit[eval]'") from None
    return plt


def wall_series(r: dict) -> tuple[slice, slice]:
    """Which per-batch points of a row the plot draws: (warm-up batches, counted batches). The partial
    last batch (``tail_frames_dropped`` frames) is neither: its wall is for fewer frames, and a line
    through it would end every row with a fake drop."""
    w, counted = r["warmup_batches"], r["frames_counted"] // r["batch"]
    return slice(0, w), slice(w, w + counted)


def save_plot(results: list[dict], path) -> None:
    """Per-batch wall over time (warm-up batches hollow, not joined) and the latency CDF of counted frames."""
    plt = check_matplotlib()
    fig, (walls, cdf) = plt.subplots(1, 2, figsize=(13, 4.5))
    for r in results:
        s = r["series"]
        t, ms = np.asarray(s["t_done_s"]), np.asarray(s["batch_wall_ms"])
        warm, counted = wall_series(r)
        line, = walls.plot(t[counted], ms[counted], ".-", label=r["row"])
        walls.plot(t[warm], ms[warm], "o", mfc="none", color=line.get_color())
        lat = np.sort(s["latency_ms"])
        cdf.plot(lat, np.arange(1, len(lat) + 1) / len(lat), label=r["row"])
    walls.set(xlabel="time since first capture (s)", ylabel="batch wall (ms)", yscale="log",
              title="per-batch wall (o: warm-up, excluded; the partial last batch is not drawn)")
    cdf.set(xlabel="end-to-end latency, capture -> out (ms)", ylabel="fraction of frames", title="latency CDF")
    for ax in (walls, cdf):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


