"""Teacher pairs for the temporal LLLite adapter: ``streamedit train pairs``.

For every clip and every prompt the *base* model (no adapter, fixed noise, the runtime's 1-step
operating point) stylizes the clip frame by frame, giving teacher frames ``y_t``. With Farnebäck flow
``flow_t = farneback(target=x_t, source=x_{t-1})`` computed on the input frames (frame t's grid,
pointing into frame t-1, exactly as the runtime's :mod:`streamedit.temporal` does), each frame gets

* ``cond_t   = warp(y_{t-1}, flow_t)``: what the adapter sees at run time (the previous output, moved
  to where the content is now); the first frame of a clip or of a shot is the input frame itself;
* ``target_t = alpha * y_t + (1 - alpha) * warp(target_{t-1}, flow_t)``: the teacher made temporally
  stable by a post-hoc blend with the flow-warped previous target; the first frame of a shot is ``y_t``.

The recursion runs on the stored (8-bit) targets, so every stored frame can be recomputed exactly from
the file. Scene cuts (:class:`streamedit.temporal.SceneCutDetector`) restart the recursion, as the
engine restarts its cond image there.

Layout of ``PAIRS_DIR``: one ``NNNN_<clip>_pK.safetensors`` per (clip, prompt) holding uint8 tensors
``source``/``cond``/``target``/``teacher`` (N,H,W,3) and ``start`` (N,) (1 = first frame of a shot),
with the prompt and settings in its metadata; ``manifest.json`` lists them (rewritten after each file,
so an interrupted run keeps what it finished).
"""

from __future__ import annotations

import json
import re
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import click
import numpy as np
import torch

from ..cli.options import load, model_options, resolve_device
from ..errors import StreameditError
from ..video.clips import find_clips, read_frames

FORMAT = "streamedit-pairs"
MANIFEST = "manifest.json"
ARRAYS = ("source", "cond", "target", "teacher")


def blend_clip(frames: np.ndarray, teacher: np.ndarray, alpha: float, cut_detect: bool = True,
               workers: int = 4) -> dict[str, np.ndarray]:
    """cond / target / start for one clip from its input frames and teacher frames ((N,H,W,3) uint8)."""
    from ..temporal.conditioner import SceneCutDetector, farneback, warp

    n = len(frames)
    with ThreadPoolExecutor(workers) as pool:  # OpenCV releases the GIL
        flows = list(pool.map(lambda t: farneback(frames[t], frames[t - 1]), range(1, n)))
    cuts = SceneCutDetector() if cut_detect else None
    cond, target = np.empty_like(frames), np.empty_like(frames)
    start = np.zeros(n, np.uint8)
    for t in range(n):
        cut = cuts.update(frames[t]) if cuts is not None else False
        if t == 0 or cut:
            cond[t], target[t], start[t] = frames[t], teacher[t], 1
            continue
        prev = torch.from_numpy(np.stack([teacher[t - 1], target[t - 1]])).permute(0, 3, 1, 2).float()
        flow = torch.from_numpy(flows[t - 1]).unsqueeze(0).expand(2, -1, -1, -1)
        moved = warp(prev, flow).permute(0, 2, 3, 1)
        cond[t] = moved[0].round().clamp(0, 255).to(torch.uint8).numpy()  # as the engine rounds its cond
        blend = alpha * torch.from_numpy(teacher[t]).float() + (1 - alpha) * moved[1]
        target[t] = blend.round().clamp(0, 255).to(torch.uint8).numpy()
    return {"cond": cond, "target": target, "start": start}


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]+", "-", text).strip("-")[:40] or "clip"


def _expected_frames(clips: list[Path], size: int, max_frames: int | None) -> int:
    """Frame count from the headers (for the progress bar; also fails early on an unreadable clip)."""
    from ..video.io import open_video

    total = 0
    for clip in clips:
        with open_video(clip, size=size) as source:
            n = source.info.frame_count or 0
        total += min(n, max_frames) if max_frames else n
    return total


def make_pairs(models, clips: list[Path], prompts: list[str], out_dir, size: int = 256, alpha: float = 0.85,
               max_frames: int | None = None, batch_size: int = 8, seed: int = 0, steps: int = 1,
               cut_detect: bool = True, progress: bool = True) -> dict:
    """Write one pair file per (clip, prompt) and ``manifest.json`` into ``out_dir``; returns a summary."""
    from tqdm import tqdm

    from ..config import EngineConfig, clean_prompt
    from ..engine.stream import StreamEngine

    if not 0.0 < alpha <= 1.0:
        raise StreameditError(f"--alpha must be in (0, 1], got {alpha}")
    if max_frames is not None and max_frames < 1:
        raise StreameditError(f"--max-frames must be >= 1, got {max_frames}")
    if not prompts:
        raise StreameditError("at least one --prompt is needed")
    prompts = [clean_prompt(p) for p in prompts]
    clips = [Path(c) for c in clips]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    # One engine for all runs: teacher = base model, same fixed noise for every frame (seeded).
    engine = StreamEngine(models, EngineConfig(prompt=prompts[0], batch_size=batch_size, steps=steps, size=size,
                                               crop=True, seed=seed, fixed_noise=True))
    manifest = {"format": FORMAT, "version": 1, "size": size, "alpha": alpha, "model": getattr(models, "source", ""),
                "seed": seed, "steps": steps, "prompts": prompts, "files": []}
    bar = tqdm(total=_expected_frames(clips, size, max_frames) * len(prompts), unit="frame", desc="pairs",
               dynamic_ncols=True, disable=None if progress else True)
    total = 0
    try:
        for i, clip in enumerate(clips):
            frames = np.stack(read_frames(clip, size, max_frames, crop=True))  # training is square
            for j, prompt in enumerate(prompts):
                engine.set_prompt(prompt)
                teacher = []
                for y in engine.run(list(frames)):
                    teacher.append(np.array(y))
                    bar.update(1)
                teacher = np.stack(teacher)
                arrays = {"source": frames, "teacher": teacher, **blend_clip(frames, teacher, alpha, cut_detect)}
                name = f"{i:04d}_{_slug(clip.stem)}_p{j}.safetensors"
                meta = {"format": FORMAT, "prompt": prompt, "clip": str(clip), "alpha": alpha, "size": size,
                        "frames": len(frames), "seed": seed, "steps": steps}
                _save(out_dir / name, arrays, meta)
                manifest["files"].append({"file": name, "clip": str(clip), "prompt": prompt, "frames": len(frames)})
                _write_json(out_dir / MANIFEST, manifest)
                total += len(frames)
    finally:
        bar.close()
        engine.close()
    return {"out_dir": str(out_dir), "files": [f["file"] for f in manifest["files"]], "clips": len(clips),
            "prompts": len(prompts), "frames": total, "wall_s": time.perf_counter() - t0}


def _save(path: Path, arrays: dict[str, np.ndarray], meta: dict) -> None:
    from safetensors.numpy import save_file

    try:
        save_file({k: np.ascontiguousarray(v) for k, v in arrays.items()}, str(path),
                  metadata={k: json.dumps(v) if not isinstance(v, str) else v for k, v in meta.items()})
    except OSError as exc:
        raise StreameditError(f"could not write {str(path)!r}: {exc.strerror or exc}") from exc


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1))
    tmp.replace(path)  # atomic: an interrupted run never leaves half a manifest


def read_manifest(pairs_dir) -> dict:
    """The manifest of a pairs folder, checked (one-line errors for every way it can be wrong)."""
    d = Path(pairs_dir)
    if not d.is_dir():
        raise StreameditError(f"--pairs {str(d)!r} is not a folder (make one with `streamedit train pairs`)")
    path = d / MANIFEST
    if not path.is_file():
        raise StreameditError(f"--pairs {str(d)!r} has no {MANIFEST} (make it with `streamedit train pairs`)")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise StreameditError(f"{str(path)!r} is not a readable pairs manifest: {exc}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT or not manifest.get("files"):
        raise StreameditError(f"{str(path)!r} lists no pair files (was `streamedit train pairs` interrupted early?)")
    for entry in manifest["files"]:
        if not (d / entry["file"]).is_file():
            raise StreameditError(f"pairs file {entry['file']!r} listed in {str(path)!r} is missing")
    return manifest


def load_pair_file(path) -> tuple[dict[str, np.ndarray], dict]:
    """(arrays, metadata) of one pair file; metadata values JSON-decoded except the prompt and clip."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="numpy") as f:
            raw = dict(f.metadata() or {})
            arrays = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not a mapping)
    except Exception as exc:  # safetensors raises several types for damaged files
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise StreameditError(f"could not read pairs file {str(path)!r}: {first}") from exc
    missing = [k for k in (*ARRAYS, "start") if k not in arrays]
    if raw.get("format") != FORMAT or missing:
        raise StreameditError(f"{str(path)!r} is not a streamedit pairs file" +
                              (f" (no {missing[0]!r} array)" if missing else ""))
    meta = {k: (v if k in ("prompt", "clip", "format") else json.loads(v)) for k, v in raw.items()}
    return arrays, meta


@click.command("pairs")
@model_options
@click.option("--clips", "clips", multiple=True, help="Video file or folder of videos (repeatable).")
@click.option("-p", "--prompt", "prompts", multiple=True, required=True, help="Edit instruction (repeatable).")
@click.option("-o", "--output", required=True, help="Output folder for the pair files and manifest.json.")
@click.option("--size", default=256, show_default=True, help="Working resolution (square: clips are centre-cropped).")
@click.option("--alpha", default=0.85, show_default=True, help="Weight of the teacher frame in the target blend.")
@click.option("--max-frames", type=int, default=None, help="Use at most N frames of each clip.")
@click.option("--exclude", multiple=True, help="Skip clips with this file name or stem (repeatable; held-out clips).")
@click.option("--batch", default=8, show_default=True, help="Frames per teacher batch.")
@click.option("--steps", default=1, show_default=True, help="Teacher denoising steps (the runtime uses 1).")
@click.option("--seed", default=0, show_default=True, help="Seed of the teacher's fixed noise.")
@click.option("--no-cut-detect", is_flag=True, help="Do not restart the blend at detected scene cuts.")
@click.option("--synthetic", default=0, show_default=True,
              help="Also generate N clips (streamedit.video.synthetic: camera motion, occluders) into OUTPUT/synthetic.")
@click.option("--synthetic-seed", default=0, show_default=True, help="Seed of the first generated clip (then +1, ...).")
@click.option("--synthetic-frames", default=48, show_default=True, help="Frames per generated clip.")
def pairs_command(model, revision, device, dtype, clips, prompts, output, size, alpha, max_frames, exclude, batch,
                  steps, seed, no_cut_detect, synthetic, synthetic_seed, synthetic_frames):
    """Make (source, cond, target) teacher pairs for training a temporal LLLite adapter."""
    from ..config import clean_prompt
    from ..eval.protocol import check_training_seeds

    if not clips and not synthetic:
        raise StreameditError("give --clips, --synthetic N, or both")
    if synthetic < 0 or synthetic_frames < 2:
        raise StreameditError(f"--synthetic must be >= 0 and --synthetic-frames >= 2, got {synthetic}, {synthetic_frames}")
    seeds = range(synthetic_seed, synthetic_seed + synthetic)
    check_training_seeds(seeds)  # the evaluation's test clips are generated too: never train on them
    files = find_clips(clips, exclude) if clips else []  # fail on bad input before any slow loading
    if synthetic:
        from ..video.synthetic import write_synthetic_clips

        files += write_synthetic_clips(Path(output) / "synthetic", seeds, synthetic_frames, size)
    prompts = [clean_prompt(p) for p in prompts]
    if not 0.0 < alpha <= 1.0:
        raise StreameditError(f"--alpha must be in (0, 1], got {alpha}")
    device, torch_dtype = resolve_device(device, dtype)
    models = load(model, revision, device, torch_dtype)
    summary = make_pairs(models, files, prompts, output, size=size, alpha=alpha, max_frames=max_frames,
                         batch_size=batch, seed=seed, steps=steps, cut_detect=not no_cut_detect)
    click.echo(f"{summary['frames']} pairs from {summary['clips']} clip(s) x {summary['prompts']} prompt(s) in "
               f"{summary['wall_s']:.1f} s -> {summary['out_dir']} ({len(summary['files'])} files)")
