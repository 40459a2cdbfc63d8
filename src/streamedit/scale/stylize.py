"""``streamedit stylize --ray``: many files, or one long file, stylized as shards on a Ray cluster.

One Ray task per shard (``num_gpus`` each, 1 by default; 0 runs them on CPUs), retried by Ray when it fails
(``max_retries``, a crashed worker or an exception alike). Each finished shard is saved at once in a folder
beside its output (``.NAME.shards/``); when every shard of an input is in, they are joined without
re-encoding (``join``) and the folder goes. Interrupted (Ctrl-C, SIGTERM) or failed, the job keeps every
finished shard in that folder (a rerun of the same command picks them up) and joins the run of finished
shards from the start into a playable output, as an interrupted ``stylize`` leaves a playable file.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import click

from ..errors import StreameditError
from ..video.io import VIDEO_CODECS, check_output, open_video
from . import connect, require_ray
from .join import join
from .shards import Shard, frame_pts, plan, stylize_shard


@dataclass
class Job:
    source: Path
    output: Path
    pts: list[int]
    time_base: object
    shards: list[Shard]
    folder: Path = field(init=False)
    done: dict = field(default_factory=dict)  # shard index -> its file

    def __post_init__(self):
        self.folder = self.output.with_name(f".{self.output.name}.shards")

    def shard_file(self, shard: Shard) -> Path:
        return self.folder / f"{shard.index:05d}{self.output.suffix.lower()}"


def outputs_for(inputs: list[str], output: str) -> list[tuple[Path, Path]]:
    """(input, output) pairs: one input writes ``output``; several write into the folder ``output``."""
    if len(inputs) == 1:
        return [(Path(inputs[0]), Path(output))]
    folder = Path(output)
    if not folder.is_dir():
        raise StreameditError(f"with {len(inputs)} inputs, -o must be an existing folder (got {output})")
    pairs = []
    for name in inputs:
        p = Path(name)
        suffix = p.suffix.lower() if p.suffix.lower() in VIDEO_CODECS else ".mp4"
        pairs.append((p, folder / f"{p.stem}{suffix}"))
    if len({o for _, o in pairs}) < len(pairs):
        raise StreameditError("two inputs would write the same output name; stylize them in separate runs")
    return pairs


def _prepare(pairs, spec: dict, batch: int, shard_frames: int, warmup: int) -> list[Job]:
    jobs = []
    for j, (src, out) in enumerate(pairs):
        with open_video(src, size=spec["size"], keep_size=spec["keep_size"], crop=spec["crop"]) as v:
            tb = v.info.time_base
        check_output(out, src)
        pts = frame_pts(src)
        jobs.append(Job(src, out, pts, tb, plan(j, len(pts), batch, shard_frames, warmup)))
    return jobs


def _resume(job: Job, key: str) -> None:
    """Reuse the shards a previous run of the same job left; a folder of another job is cleared."""
    stamp = job.folder / "job.json"
    st = job.source.stat()
    ident = json.dumps([str(job.source.resolve()), st.st_size, st.st_mtime_ns, key,
                        [(s.start, s.end, s.warm) for s in job.shards]])
    if stamp.exists() and stamp.read_text() == ident:
        job.done = {s.index: job.shard_file(s) for s in job.shards if job.shard_file(s).exists()}
        return
    if job.folder.exists():
        shutil.rmtree(job.folder)
    job.folder.mkdir()
    stamp.write_text(ident)


def _save(job: Job, shard: Shard, data: bytes) -> None:
    final = job.shard_file(shard)
    tmp = final.with_name(f".{final.name}.partial")
    tmp.write_bytes(data)
    os.replace(tmp, final)  # a shard file is whole or absent
    job.done[shard.index] = final


def _finish(job: Job, complete: bool) -> str:
    """Join what the job has: everything (the folder goes), else the finished shards from the start."""
    prefix = []
    for s in job.shards:
        if s.index not in job.done:
            break
        prefix.append(s)
    if not prefix:
        return f"{job.source}: no shard finished; nothing written ({len(job.done)} later shards kept in {job.folder})"
    whole = len(prefix) == len(job.shards)
    join([job.done[s.index] for s in prefix], [job.pts[s.start] for s in prefix], job.time_base, job.source,
         job.output, whole)
    frames = prefix[-1].end
    if whole and complete:
        shutil.rmtree(job.folder, ignore_errors=True)
        return f"{frames} frames -> {job.output}"
    return (f"{job.source}: {frames} of {len(job.pts)} stylized frames saved to {job.output}; "
            f"{len(job.done)} of {len(job.shards)} shards kept in {job.folder} (run the same command to finish)")


def run(inputs: list[str], output: str, spec: dict, *, batch: int, address: str | None, gpus: float,
        shard_frames: int, warmup: int, key: str) -> int:
    """Stylize every input on the cluster at ``address``; returns the exit code (0, 1 failed, 130 interrupted)."""
    from tqdm import tqdm

    ray = require_ray()
    jobs = _prepare(outputs_for(inputs, output), spec, batch, shard_frames, warmup)
    key = hashlib.sha256(key.encode()).hexdigest()[:16]
    for job in jobs:
        _resume(job, key)
    ours = not ray.is_initialized()  # our own connection: ended here when shards are left running
    connect(address)

    @ray.remote(num_cpus=0)
    class Progress:
        def __init__(self):
            self.frames = {}

        def set(self, k, n):
            self.frames[k] = n

        def total(self):
            return sum(self.frames.values())

    task = ray.remote(stylize_shard).options(num_gpus=gpus, num_cpus=1, max_retries=2, retry_exceptions=True)
    progress = Progress.remote()
    reused = sum(s.end - s.start for j in jobs for s in j.shards if s.index in j.done)
    todo = [(j, s) for j in jobs for s in j.shards if s.index not in j.done]
    click.echo(f"--ray: {sum(len(j.shards) for j in jobs)} shards of {len(jobs)} input(s), {len(todo)} to run"
               + (f" ({reused} frames reused from an earlier run)" if reused else "")
               + f", {gpus:g} GPU each", err=True)
    pending = {task.remote(s, {**spec, "path": str(j.source), "from_pts": j.pts[s.first],
                                   "suffix": j.output.suffix.lower()}, progress): (j, s)
               for j, s in todo}
    total = sum(len(j.pts) for j in jobs)
    bar = tqdm(total=total, initial=reused, unit="frame", desc="stylize", dynamic_ncols=True, disable=None)
    code, error, t0, finished = 0, None, time.perf_counter(), reused
    try:
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=0.5)
            for ref in ready:
                job, shard = pending.pop(ref)
                try:
                    _save(job, shard, ray.get(ref))
                    finished += shard.end - shard.start
                except ray.exceptions.RayError as e:
                    error = error or f"shard {shard.index} of {job.source} failed after retries: {_reason(e)}"
            running = ray.get(progress.total.remote())  # kept frames of finished and running tasks
            bar.n = min(total, reused + running)
            bar.set_postfix(fps=f"{running / max(time.perf_counter() - t0, 1e-9):.1f}", refresh=True)
            if error:
                break
    except KeyboardInterrupt:
        code = 130
    finally:
        bar.close()
        if pending:
            _abandon(ray, list(pending), ours)
    if error:
        code = 1
    for job in jobs:
        click.echo(_finish(job, code == 0), err=code != 0)
    if error:
        click.echo(f"error: {error}", err=True)
    elif code == 130:
        click.echo("interrupted", err=True)
    return code


def _abandon(ray, refs: list, ours: bool) -> None:
    """Stop the shards still running. On our own connection, by ending it: the cluster ends a driver's tasks
    with it. ``ray.cancel`` races with a shard's completion reply inside Ray and can abort the driver
    (RAY_CHECK "Tried to complete task that was not pending", seen with Ray 2.60 in CI after Ctrl-C, when
    the finished shards were already saved), which would turn a clean interrupt into a crash. A connection
    the caller made is left open: its shards are cancelled without force."""
    if ours:
        ray.shutdown()
        return
    for ref in refs:
        ray.cancel(ref, force=False)


def _reason(e: Exception) -> str:
    text = str(getattr(e, "cause", None) or e).strip().splitlines()
    return text[-1][:300] if text else type(e).__name__
