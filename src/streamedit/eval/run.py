"""``streamedit eval``: stylize every clip of a folder through the engine and measure the results.

Per clip: decode (a clip that cannot be decoded is reported and skipped), run ``StreamEngine.run``,
then :func:`streamedit.eval.metrics.compute_all` on (working-size inputs, outputs), with the
Farnebäck flow of the inputs computed once and reused by every windowed measurement.

Writes into ``--out``: ``metrics.jsonl`` (one line per clip, failures included, each with the run's
settings), ``summary.md`` (tables) and, with ``--baseline OTHER.jsonl``, ``comparison.jsonl``
(per clip and metric: baseline, current, delta, % change; clip ``(mean)`` averages matched clips).
``--drift`` ping-pong loops each clip to ``--drift-frames`` (no artificial cut at the seam) and
reports each metric per ``--window`` frames with its std; ``--cut-at N`` / ``--detect-cuts``
(the engine's :class:`~streamedit.temporal.SceneCutDetector`) report the windows before/after cuts.
"""

from __future__ import annotations

import datetime
import itertools
import json
import math
import time
from pathlib import Path

import click
import numpy as np

from ..cli.options import lllite_options, load, model_options, resolve_device, te_size_option, temporal_config
from ..errors import StreameditError
from ..video.clips import find_clips

WINDOW_METRICS = ("warp_error", "sobel", "hf_fft")  # cheap enough to run per window


def ping_pong(frames: list, n: int) -> list:
    """``frames`` played forward, backward, forward... to ``n`` frames: long input without a cut at the seam."""
    cycle = frames + frames[-2:0:-1] if len(frames) > 2 else frames
    return [cycle[i % len(cycle)] for i in range(n)]


def read_jsonl(path) -> list[dict]:
    try:
        return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    except (OSError, ValueError) as exc:
        raise StreameditError(f"cannot read {path} as JSONL: {exc}") from None


def window_metrics(outputs, flows, a: int, b: int) -> dict:
    """warp error / Sobel / HF-FFT of outputs[a:b] (flow pairs inside the window only)."""
    from .metrics import hf_fft_energy, sobel_sharpness, warp_error

    res = {"frames": [a, b], "sobel": sobel_sharpness(outputs[a:b]), "hf_fft": hf_fft_energy(outputs[a:b])}
    res["warp_error"] = warp_error(None, outputs[a:b], flows[a:b - 1]) if b - a >= 2 else math.nan
    return res


def drift_report(outputs, flows, window: int) -> dict:
    from .metrics import hf_fft_energy, sobel_sharpness, warp_error, windowed

    return {"window": window,
            "warp_error": windowed(lambda o, flows: warp_error(None, o, flows), outputs, window=window, flows=flows),
            "sobel": windowed(sobel_sharpness, outputs, window=window),
            "hf_fft": windowed(hf_fft_energy, outputs, window=window)}


def detect_cuts(frames) -> list[int]:
    from ..temporal.conditioner import SceneCutDetector

    det = SceneCutDetector()
    return [i for i, f in enumerate(frames) if det.update(f)]


def eval_clip(models, config, path: Path, opts: dict) -> dict:
    """One clip -> its JSONL record (raises StreameditError if it cannot be decoded)."""
    from ..engine.stream import StreamEngine
    from ..video.clips import write_clip
    from ..video.io import open_video
    from .metrics import compute_all, compute_flows

    src = open_video(path, size=config.size)
    frames = list(itertools.islice(src.frames(), opts["max_frames"]))
    rec = {"clip": path.name, "path": str(path), "frames_decoded": len(frames)}
    if src.warning:
        rec["warning"] = src.warning
    if len(frames) < 2:
        raise StreameditError(f"{path.name}: only {len(frames)} decodable frame(s); metrics need 2")
    if opts["drift"]:
        frames = ping_pong(frames, opts["drift_frames"])
    engine = StreamEngine(models, config)
    t0 = time.perf_counter()
    try:
        outputs = np.stack(list(engine.run(frames)))
    finally:
        engine.close()
    rec.update(frames=len(frames), stylize_fps=len(frames) / (time.perf_counter() - t0))
    inputs = np.stack(frames)
    flows = compute_flows(inputs)
    metrics = compute_all(inputs, outputs, config.prompt, lpips_weights=opts["lpips_weights"],
                          clip_model=opts["clip_model"], raft_weights=opts["raft_weights"], flows=flows,
                          device=models.device)
    rec["skipped_metrics"] = metrics.pop("skipped")
    rec["metrics"] = metrics
    if opts["drift"]:
        rec["drift"] = drift_report(outputs, flows, opts["window"])
    given = {c for c in opts["cut_at"] if 0 < c < len(frames)}
    found = set(detect_cuts(frames)) if opts["detect_cuts"] else set()
    w = opts["window"]
    rec["cuts"] = [{"at": c, "given": c in given, "detected": c in found,
                    "before": window_metrics(outputs, flows, max(0, c - w), c),
                    "after": window_metrics(outputs, flows, c, min(len(frames), c + w))} for c in sorted(given | found)]
    if opts["save_videos"]:
        write_clip(Path(opts["out"]) / f"{path.stem}.stylized.mp4", list(outputs), float(src.info.fps))
    return rec


def compare(current: list[dict], baseline: list[dict]) -> list[dict]:
    """Per clip (matched by name) and metric: baseline, current, delta, % change; plus '(mean)' rows."""
    base = {r["clip"]: r for r in baseline if "metrics" in r}
    rows, by_metric = [], {}
    for r in current:
        b = base.get(r["clip"])
        if "metrics" not in r or b is None:
            continue
        # the same input is measured the same way: else the deltas mix two different clips
        si = (b["metrics"].get("sobel_input"), r["metrics"].get("sobel_input"))
        same = b.get("frames") == r["frames"] and None not in si and math.isclose(*si, rel_tol=1e-5)
        for k, cur in r["metrics"].items():
            old = b["metrics"].get(k)
            if isinstance(old, (int, float)) and isinstance(cur, (int, float)):
                rows.append(_delta(r["clip"], k, old, cur, same))
                by_metric.setdefault(k, []).append((old, cur, same))
    for k, v in by_metric.items():
        rows.append(_delta("(mean)", k, float(np.mean([x[0] for x in v])), float(np.mean([x[1] for x in v])),
                           all(x[2] for x in v)))
    return rows


def _delta(clip, metric, base, cur, same_input) -> dict:
    delta = cur - base
    pct = 100 * delta / abs(base) if base and math.isfinite(base) else None
    return {"clip": clip, "metric": metric, "baseline": base, "current": cur, "delta": delta, "pct": pct,
            "same_input": same_input}


# -------------------------------------------------------------------------------------------- summary
def _g(v) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "—"
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def _table(head: list[str], rows: list[list]) -> list[str]:
    return ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)] + \
           ["| " + " | ".join(_g(x) for x in row) + " |" for row in rows]


def summary_markdown(records: list[dict], meta: dict, comparison: list[dict] | None, baseline: str | None) -> str:
    ok = [r for r in records if "metrics" in r]
    keys = list(dict.fromkeys(k for r in ok for k in r["metrics"]))
    lines = ["# streamedit eval", "",
             f"model `{meta['model']}` on {meta['device']}, prompt \"{meta['prompt']}\", {meta['date']}", "",
             "settings: " + ", ".join(f"{k}={v}" for k, v in meta["config"].items() if k != "prompt"), ""]
    lines += _table(["clip", "frames", "fps"] + keys,
                    [[r["clip"], r["frames"], r["stylize_fps"]] + [r["metrics"].get(k) for k in keys] for r in ok])
    failed = [r for r in records if "error" in r]
    if failed:
        lines += ["", "Skipped clips (could not be decoded):", ""] + [f"- `{r['clip']}`: {r['error']}" for r in failed]
    skipped = {k: v for r in ok for k, v in r["skipped_metrics"].items()}
    if skipped:
        lines += ["", "Metrics not computed: " + "; ".join(f"{k}: {v}" for k, v in skipped.items())]
    warned = [r for r in ok if "warning" in r]
    lines += [f"- `{r['clip']}`: decoded partly: {r['warning']}" for r in warned]
    drift = [r for r in ok if "drift" in r]
    if drift:
        lines += ["", f"## Drift (ping-pong looped, windows of {drift[0]['drift']['window']} frames)", ""]
        lines += _table(["clip", "metric", "mean", "std", "per window"],
                        [[r["clip"], m, r["drift"][m]["mean"], r["drift"][m]["std"],
                          " ".join(_g(v) for v in r["drift"][m]["values"])] for r in drift for m in WINDOW_METRICS])
    cuts = [(r["clip"], c) for r in ok for c in r.get("cuts", [])]
    if cuts:
        lines += ["", "## Around cuts (window before / after the first frame of the new shot)", ""]
        lines += _table(["clip", "cut at", "metric", "before", "after", "after - before"],
                        [[clip, c["at"], m, c["before"][m], c["after"][m], c["after"][m] - c["before"][m]]
                         for clip, c in cuts for m in WINDOW_METRICS])
    if comparison is not None:
        lines += ["", f"## Versus baseline `{baseline}`", ""]
        lines += _table(["clip", "metric", "baseline", "current", "delta", "% change"],
                        [[c["clip"], c["metric"], c["baseline"], c["current"], c["delta"], c["pct"]]
                         for c in sorted(comparison, key=lambda c: c["clip"] != "(mean)")])
        if not comparison:
            lines.append("(no clip of this run is in the baseline)")
        differ = sorted({c["clip"] for c in comparison if not c["same_input"] and c["clip"] != "(mean)"})
        if differ:
            lines += ["", "**warning**: input frames differ from the baseline's for " + ", ".join(differ)]
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------------ CLI
@click.command("eval")
@click.option("--clips", required=True, help="Folder of video clips (or one clip).")
@click.option("-p", "--prompt", required=True, help="The edit instruction.")
@click.option("--out", "out_dir", required=True, help="Folder for metrics.jsonl, summary.md, comparison.jsonl.")
@model_options
@lllite_options
@click.option("--baseline", default=None, help="metrics.jsonl of another run to compare against.")
@click.option("--drift", is_flag=True, help="Loop each clip to --drift-frames; metrics per --window frames.")
@click.option("--drift-frames", default=480, show_default=True, type=click.IntRange(2))
@click.option("--window", default=64, show_default=True, type=click.IntRange(2), help="Frames per window.")
@click.option("--cut-at", multiple=True, type=click.IntRange(1), help="Frame index of a cut (repeatable).")
@click.option("--detect-cuts", is_flag=True, help="Also find cuts with the engine's scene-cut detector.")
@click.option("--lpips-weights", default=None, help="Local LPIPS weights file (optional metric).")
@click.option("--clip-model", default=None, help="Local CLIP model folder (optional metric).")
@click.option("--raft-weights", default=None, help="Local RAFT weights file (optional metric).")
@click.option("--size", type=int, default=None,
              help="Working size (long side; aspect kept). Default: the model's own (256 for demo), else 512.")
@click.option("--batch", default=8, show_default=True)
@click.option("--steps", default=1, show_default=True)
@click.option("--seed", default=0, show_default=True)
@click.option("--fixed-noise", is_flag=True)
@click.option("--max-frames", default=None, type=click.IntRange(2), help="Decode at most N frames per clip.")
@te_size_option
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE", help="Any other EngineConfig field.")
@click.option("--save-videos", is_flag=True, help="Also write each stylized clip into --out.")
def eval_command(clips, prompt, out_dir, model, revision, device, dtype, baseline, drift, drift_frames, window, cut_at,
                 detect_cuts, lpips_weights, clip_model, raft_weights, size, batch, steps, seed, fixed_noise,
                 max_frames, te_size, sets, save_videos, **temporal):
    """Stylize each clip of --clips, measure it, and compare with a previous run."""
    import torch

    from ..bench.command import command_line, device_name
    from ..config import build_config, clean_prompt, parse_sets
    from ..telemetry import dumps

    paths = find_clips([clips])
    base_records = read_jsonl(baseline) if baseline else None
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    from ..models.loading import working_size

    size = working_size(size, model)
    base = dict(prompt=clean_prompt(prompt), batch_size=batch, steps=steps, size=size, seed=seed,
                fixed_noise=fixed_noise, te_size=te_size, **temporal_config(**temporal))
    config, _ = build_config(base, {}, parse_sets(sets))
    device, torch_dtype = resolve_device(device, dtype)
    models = load(model, revision, device, torch_dtype)
    meta = {"model": model, "device": device_name(models.device), "dtype": str(torch_dtype), "torch": torch.__version__,
            "prompt": config.prompt, "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "command": command_line(click.get_current_context()),
            "config": json.loads(dumps(vars(config)))}
    opts = dict(max_frames=max_frames, drift=drift, drift_frames=drift_frames, window=window, cut_at=cut_at,
                detect_cuts=detect_cuts, lpips_weights=lpips_weights, clip_model=clip_model,
                raft_weights=raft_weights, save_videos=save_videos, out=out)
    records = []
    with open(out / "metrics.jsonl", "w") as fh:
        for path in paths:
            try:
                rec = eval_clip(models, config, path, opts)
                m = rec["metrics"]
                click.echo(f"{path.name}: {rec['frames']} frames, warp_error {m['warp_error']:.4g} "
                           f"(input {m['warp_error_input']:.4g}), sobel {m['sobel']:.4g}", err=True)
            except StreameditError as exc:  # undecodable: report, keep going with the other clips
                rec = {"clip": path.name, "path": str(path), "error": str(exc)}
                click.echo(f"skipped {path.name}: {exc}", err=True)
            records.append(rec)
            fh.write(dumps({**rec, "run": meta}) + "\n")
            fh.flush()
    comparison = compare(records, base_records) if base_records is not None else None
    if comparison is not None:
        with open(out / "comparison.jsonl", "w") as fh:
            fh.writelines(dumps(c) + "\n" for c in comparison)
    summary = summary_markdown(records, meta, comparison, baseline)
    (out / "summary.md").write_text(summary)
    click.echo(summary)
    if not any("metrics" in r for r in records):
        raise StreameditError(f"none of the {len(records)} clip(s) could be evaluated")
