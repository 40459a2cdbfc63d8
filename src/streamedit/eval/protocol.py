"""The temporal adapter's evaluation protocol (issue 29): a split that cannot flatter, and its report.

The split, kept here in code so every command reads the same one:

* **train**: the DAVIS clips ``DAVIS_TRAIN`` (``../shared/data/clips``), plus generated clips with seeds
  below ``RESERVED_SEEDS`` (``train pairs --synthetic``);
* **tune**: the DAVIS clip ``DAVIS_TUNE`` (blackswan), for choosing settings (multiplier, steps, ...);
* **test**: generated clips (:mod:`streamedit.video.synthetic`) with the seeds ``TEST_SEEDS`` (one per
  camera motion) and, for the scene-cut check, ``CUT_SEEDS``. All lie in ``RESERVED_SEEDS``, which
  ``train pairs --synthetic`` refuses. The DAVIS clips cannot be the test set: the bundled adapter was
  trained on five of them (``train pairs --exclude blackswan``) and tuned on the sixth.

``streamedit eval protocol --set test`` stylizes every test clip in every style, without the adapter and
with it at each ``--refresh`` (cond refresh every N batches; 8 is the runtime default), at fixed noise, and
reports per clip and style the warp error change and Sobel kept against the no-adapter run, the per-style
means over clips (each clip weighs the same), the mean of the styles and the verdict against ``TARGETS``
at refresh 8. The scene-cut check runs the cut clips at refresh 8 with cut-triggered refresh on and off.
Its proxy (cheaper than LPIPS): the PSNR of the adapter's output against the no-adapter output of the
same frame, over the frames after the cut, next to the same over the frames before it. A stale cond from
the old shot pulls the output off the base stylization of the new one, which lowers it.
"""

from __future__ import annotations

import datetime
import json
import math
import time
from pathlib import Path

import click
import numpy as np

from ..errors import StreameditError

DAVIS_TRAIN = ("bmx-trees", "camel", "dance-twirl", "goat", "kite-surf")
DAVIS_TUNE = ("blackswan",)
RESERVED_SEEDS = range(9000, 10000)  # generated clips of the test set: never for training
TEST_SEEDS = (9001, 9002, 9003, 9004, 9005, 9006, 9007, 9008)
TEST_MOTIONS = ("pan", "zoom", "rotate", "mixed")  # clip i moves as TEST_MOTIONS[i % 4]
CUT_SEEDS = (9501, 9502, 9503, 9504)
CUT_FRAMES, CUT_AT = 64, 38  # at B=4, refresh 8: the cond refreshed at frame 32 is pre-cut and stale to 64
TARGETS = {"refresh": 8, "mean_warp_pct": -25.0, "sobel_kept_pct": 90.0, "worst_style_pct": -15.0}
SETS = ("test", "tune", "train")


def check_training_seeds(seeds) -> None:
    """Refuse generated training clips whose seeds belong to the test set."""
    bad = sorted(s for s in seeds if s in RESERVED_SEEDS)
    if bad:
        raise StreameditError(f"synthetic seed(s) {bad[:5]} are reserved for the evaluation test set "
                              f"({RESERVED_SEEDS.start}-{RESERVED_SEEDS.stop - 1}); pick others")


def test_clips(n: int, frames: int, size: int) -> list[tuple[str, np.ndarray]]:
    from ..video.synthetic import synthetic_clip

    if not 0 <= n <= len(TEST_SEEDS):  # 0: the scene-cut check only
        raise StreameditError(f"--clips must be 0-{len(TEST_SEEDS)} for the test set, got {n}")
    return [(f"synth-{s}-{TEST_MOTIONS[i % 4]}", synthetic_clip(s, frames, size, size, motion=TEST_MOTIONS[i % 4]))
            for i, s in enumerate(TEST_SEEDS[:n])]


def cut_clips(n: int, size: int) -> list[tuple[str, np.ndarray]]:
    from ..video.synthetic import synthetic_clip

    if not 0 <= n <= len(CUT_SEEDS):
        raise StreameditError(f"--cut-clips must be 0-{len(CUT_SEEDS)}, got {n}")
    return [(f"synth-{s}-cut{CUT_AT}", synthetic_clip(s, CUT_FRAMES, size, size, cut_at=CUT_AT)) for s in CUT_SEEDS[:n]]


def davis_clips(which: str, folder, n: int, frames: int, size: int) -> list[tuple[str, np.ndarray]]:
    from ..video.clips import read_frames

    if folder is None:
        raise StreameditError(f"--set {which} reads the DAVIS clips: give --clips-dir (../shared/data/clips)")
    names = (DAVIS_TUNE if which == "tune" else DAVIS_TRAIN)[:n]
    paths = [Path(folder) / f"{name}.mp4" for name in names]
    missing = [p.name for p in paths if not p.is_file()]
    if missing:
        raise StreameditError(f"--clips-dir {str(folder)!r} lacks {', '.join(missing)}")
    return [(p.stem, np.stack(read_frames(p, size, frames))) for p in paths]


def stylize(models, frames: np.ndarray, style: str, *, lllite=None, refresh: int = 8, cut_refresh: bool = True,
            batch: int = 4, seed: int = 0, multiplier: float = 1.0) -> np.ndarray:
    """The engine's output for ``frames`` (fixed noise, 1 step), with or without the adapter."""
    from ..cli.options import temporal_config
    from ..config import build_config
    from ..engine.stream import StreamEngine

    base = dict(prompt=style, batch_size=batch, steps=1, size=max(frames.shape[1:3]), seed=seed, fixed_noise=True,
                **temporal_config(lllite, None, refresh, multiplier, cut_refresh, None))
    config, _ = build_config(base, {}, {})
    engine = StreamEngine(models, config)
    try:
        return np.stack(list(engine.run(list(frames))))
    finally:
        engine.close()


def measure_clip(models, name, frames, styles, refreshes, lllite, opts, log=None) -> list[dict]:
    """One record per (style, refresh) with the adapter, each against the same no-adapter run."""
    from .metrics import compute_flows, sobel_sharpness, warp_error

    flows = compute_flows(frames)
    eps_in = warp_error(None, frames, flows)
    rows = []
    for style in styles:
        off = stylize(models, frames, style, **opts)
        e_off, s_off = warp_error(None, off, flows), sobel_sharpness(off)
        for r in refreshes:
            t0 = time.perf_counter()
            on = stylize(models, frames, style, lllite=lllite, refresh=r, **opts)
            e_on, s_on = warp_error(None, on, flows), sobel_sharpness(on)
            rows.append({"clip": name, "style": style, "refresh": r, "frames": len(frames), "warp_input": eps_in,
                         "warp_off": e_off, "warp_on": e_on, "warp_pct": 100 * (e_on / e_off - 1),
                         "sobel_off": s_off, "sobel_on": s_on, "sobel_kept_pct": 100 * s_on / s_off,
                         "fps_on": len(frames) / (time.perf_counter() - t0)})
            if log:
                log(rows[-1])
    return rows


def measure_cut(models, name, frames, styles, lllite, opts, window: int = 24, log=None) -> list[dict]:
    """PSNR against the no-adapter output before / after the cut, cut-triggered refresh on and off."""
    from .metrics import psnr_per_frame

    rows = []
    after = slice(CUT_AT, min(len(frames), CUT_AT + window))
    before = slice(max(0, CUT_AT - window), CUT_AT)
    for style in styles:
        off = stylize(models, frames, style, **opts)
        for cut_refresh in (True, False):
            on = stylize(models, frames, style, lllite=lllite, refresh=8, cut_refresh=cut_refresh, **opts)
            first4 = slice(CUT_AT, CUT_AT + 4)
            rows.append({"clip": name, "style": style, "cut_refresh": cut_refresh, "cut_at": CUT_AT,
                         **{f"psnr_{k}": float(np.mean(psnr_per_frame(on[w], off[w])))
                            for k, w in (("before", before), ("after", after), ("first4", first4))}})
            if log:
                log(rows[-1])
    return rows


# ------------------------------------------------------------------------------------------- report
def summarize(rows: list[dict]) -> dict:
    """Per (refresh, style): the mean over clips of warp % change and Sobel kept; per refresh: the mean of the
    styles, the worst style and (at the target refresh) the verdict."""
    out = {}
    for r in dict.fromkeys(row["refresh"] for row in rows):  # in the order measured
        styles = {}
        for s in dict.fromkeys(row["style"] for row in rows):
            sel = [row for row in rows if row["refresh"] == r and row["style"] == s]
            if sel:
                styles[s] = {"warp_pct": float(np.mean([x["warp_pct"] for x in sel])),
                             "sobel_kept_pct": float(np.mean([x["sobel_kept_pct"] for x in sel])), "clips": len(sel)}
        mean_w = float(np.mean([v["warp_pct"] for v in styles.values()]))
        mean_s = float(np.mean([v["sobel_kept_pct"] for v in styles.values()]))
        worst = max(styles, key=lambda k: styles[k]["warp_pct"])
        checks = {"mean_warp": mean_w <= TARGETS["mean_warp_pct"], "sobel": mean_s >= TARGETS["sobel_kept_pct"],
                  "worst_style": styles[worst]["warp_pct"] <= TARGETS["worst_style_pct"]}
        out[r] = {"styles": styles, "mean_warp_pct": mean_w, "mean_sobel_kept_pct": mean_s, "worst_style": worst,
                  "checks": checks, "pass": all(checks.values())}
    return out


def _f(v, spec=".2f"):
    return "—" if v is None or (isinstance(v, float) and not math.isfinite(v)) else format(v, spec)


def report_markdown(meta: dict, rows: list[dict], summary: dict, cuts: list[dict]) -> str:
    lines = [f"# eval protocol: set `{meta['set']}`", "",
             (f"model `{meta['model']}`, adapter `{meta['lllite']}`, {meta['size']}², B={meta['batch']}, fixed noise "
              f"(seed {meta['seed']}), {meta['frames']} frames per clip, {meta['device']}, {meta['date']}"), "",
             f"command: `{meta['command']}`", "",
             "| clip | style | refresh | ε_w input | ε_w off | ε_w on | change | Sobel off | Sobel on | kept |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    lines += [f"| {x['clip']} | {x['style']} | {x['refresh']} | {x['warp_input']:.5f} | {x['warp_off']:.5f} | "
              f"{x['warp_on']:.5f} | {x['warp_pct']:+.1f} % | {x['sobel_off']:.4f} | {x['sobel_on']:.4f} | "
              f"{x['sobel_kept_pct']:.1f} % |" for x in rows]
    for r, s in summary.items():
        lines += ["", f"**Cond refresh {r}** (mean over {next(iter(s['styles'].values()))['clips']} clips per style)",
                  "", "| style | ε_w change | Sobel kept |", "|---|---|---|"]
        lines += [f"| {k} | {v['warp_pct']:+.1f} % | {v['sobel_kept_pct']:.1f} % |" for k, v in s["styles"].items()]
        lines.append(f"| **mean** | **{s['mean_warp_pct']:+.1f} %** | **{s['mean_sobel_kept_pct']:.1f} %** |")
        if r == TARGETS["refresh"]:
            c = s["checks"]
            lines += ["", (f"Targets at refresh {r}: mean ε_w ≤ {TARGETS['mean_warp_pct']:+.0f} % "
                           f"({'pass' if c['mean_warp'] else 'FAIL'}), Sobel kept ≥ {TARGETS['sobel_kept_pct']:.0f} % "
                           f"({'pass' if c['sobel'] else 'FAIL'}), worst style ({s['worst_style']}) ≤ "
                           f"{TARGETS['worst_style_pct']:+.0f} % ({'pass' if c['worst_style'] else 'FAIL'}): "
                           f"**{'PASS' if s['pass'] else 'FAIL'}**")]
    if cuts:
        lines += ["", (f"**Scene cut** (cut at frame {CUT_AT} of {CUT_FRAMES}, refresh 8; PSNR in dB of the adapter's "
                       "output against the no-adapter output, higher = closer to the base stylization)"), "",
                  "| clip | style | cut refresh | before the cut | after the cut | first 4 after |", "|---|---|---|---|---|---|"]
        lines += [f"| {x['clip']} | {x['style']} | {'on' if x['cut_refresh'] else 'off'} | {_f(x['psnr_before'])} | "
                  f"{_f(x['psnr_after'])} | {_f(x['psnr_first4'])} |" for x in cuts]
        for on in (True, False):
            sel = [x for x in cuts if x["cut_refresh"] == on]
            lines.append(f"| **mean** | | **{'on' if on else 'off'}** | {_f(np.mean([x['psnr_before'] for x in sel]))} | "
                         f"{_f(np.mean([x['psnr_after'] for x in sel]))} | {_f(np.mean([x['psnr_first4'] for x in sel]))} |")
    return "\n".join(lines) + "\n"


@click.command("protocol")
@click.option("--set", "which", type=click.Choice(SETS), default="test", show_default=True,
              help="Which part of the split to measure; only `test` may be reported as a result.")
@click.option("--model", default="demo", show_default=True)
@click.option("--lllite", default="demo", show_default=True, help="Adapter file, or 'demo' (the bundled one).")
@click.option("--lllite-multiplier", default=1.0, show_default=True)
@click.option("--device", default="cpu", show_default=True)
@click.option("--dtype", type=click.Choice(["float32", "bfloat16", "float16"]), default=None, help="float32 | bfloat16 | float16 (default: float32 on CPU, bfloat16 on CUDA).")
@click.option("--clips", "n_clips", default=4, show_default=True, help="Clips of the set to use (test: 1-8).")
@click.option("--frames", default=40, show_default=True, type=click.IntRange(8), help="Frames per clip.")
@click.option("--refresh", "refreshes", multiple=True, type=click.IntRange(1), default=(8, 1), show_default=True,
              help="Cond refresh interval(s) to measure (repeatable).")
@click.option("-p", "--style", "styles", multiple=True, help="Styles (default: the demo model's four).")
@click.option("--cut-clips", "n_cut", default=2, show_default=True, help="Generated clips with a cut for the scene-cut check.")
@click.option("--clips-dir", default=None, help="Folder of the DAVIS clips (for --set tune / train).")
@click.option("--size", default=256, show_default=True)
@click.option("--batch", default=4, show_default=True)
@click.option("--seed", default=0, show_default=True)
@click.option("--out", "out_dir", required=True, help="Folder for rows.jsonl, cuts.jsonl, report.md.")
def protocol_command(which, model, lllite, lllite_multiplier, device, dtype, n_clips, frames, refreshes, styles, n_cut,
                     clips_dir, size, batch, seed, out_dir):
    """Per clip and style, adapter on/off, on one part of the train/tune/test split (test by default)."""
    import torch

    from ..cli.options import command_line, load, resolve_device, temporal_config
    from ..telemetry import device_name
    from ..train.filters import STYLES

    styles = list(styles) or list(STYLES)
    temporal_config(lllite, None, 8, 1.0, True, None)  # a missing adapter file: one line, before loading
    clips = test_clips(n_clips, frames, size) if which == "test" else davis_clips(which, clips_dir, n_clips, frames,
                                                                                   size)
    cuts_in = cut_clips(n_cut, size) if which == "test" else []
    dev, torch_dtype = resolve_device(device, dtype)
    models = load(model, None, dev, torch_dtype)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    meta = {"set": which, "model": model, "lllite": lllite, "size": size, "batch": batch, "seed": seed,
            "frames": frames, "device": device_name(models.device), "dtype": str(torch_dtype), "torch": torch.__version__,
            "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "command": command_line(click.get_current_context()).replace("streamedit ", "streamedit eval ", 1)}
    opts = {"batch": batch, "seed": seed, "multiplier": lllite_multiplier}

    refreshes = sorted(set(refreshes), reverse=True)
    with open(out / "rows.jsonl", "w") as fr, open(out / "cuts.jsonl", "w") as fc:
        def log(row):  # each row as it comes: a long CPU run keeps what it measured
            click.echo(json.dumps(row), err=True)
            fh = fc if "cut_refresh" in row else fr
            fh.write(json.dumps({**row, "run": meta}) + "\n")
            fh.flush()

        rows = [row for name, f in clips for row in measure_clip(models, name, f, styles, refreshes, lllite, opts, log)]
        cuts = [row for name, f in cuts_in for row in measure_cut(models, name, f, styles, lllite, opts, log=log)]
    summary = summarize(rows)
    (out / "summary.json").write_text(json.dumps({"meta": meta, "targets": TARGETS,
                                                  "summary": {str(k): v for k, v in summary.items()}}, indent=1))
    report = report_markdown(meta, rows, summary, cuts)
    (out / "report.md").write_text(report)
    click.echo(report)
