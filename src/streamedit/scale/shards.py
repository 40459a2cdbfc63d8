"""Cutting a video into shards, and stylizing one shard (the body of a Ray task).

A shard is the frame range ``[start, end)`` of one input. Its task decodes from ``start - warm`` (seeking to
the keyframe before, so a shard costs its own length, not the file's), runs every frame through the engine
(the worker's engine from its last shard, restarted: ``StreamEngine.restart``; a fresh one for another
config) and keeps only ``[start, end)``: the ``warm`` frames before it carry the temporal adapter's state
(previous output, flow) into the shard and are then dropped. Boundaries are multiples of the batch size and
the engine's per-frame noise is advanced to the shard's first frame (``StreamEngine.skip_noise``), so every
batch holds the frames, and every frame the noise, that one process running the whole file gives it: without
an adapter the shards are that run's frames exactly (tests/test_scale_stylize.py).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import av

from ..errors import StreameditError
from ..video.io import READ_AHEAD, VideoSource, _open_input


@dataclass(frozen=True)
class Shard:
    job: int        # which input
    index: int      # its place in that input's output
    start: int      # first frame kept
    end: int        # one past the last frame kept
    warm: int       # frames before ``start`` run through the engine and dropped

    @property
    def first(self) -> int:
        return self.start - self.warm


def frame_pts(path) -> list[int]:
    """Every video frame's timestamp, in order, from the packets alone (no decoding): a shard's first frame
    is found by seeking to its timestamp."""
    try:
        with _open_input(Path(path)) as c:
            st = next(s for s in c.streams.video if not s.disposition & av.stream.Disposition.attached_pic)
            pts = [p.pts for p in c.demux(st) if p.size]
    except (av.FFmpegError, OSError, StopIteration) as e:
        raise StreameditError(f"cannot index the frames of {path} for --ray: {e}") from None
    if any(p is None for p in pts):
        raise StreameditError(f"{path}: its packets carry no timestamps, so it cannot be cut into shards; "
                              "run it without --ray")
    return sorted(pts)


def plan(job: int, frames: int, batch: int, shard_frames: int, warmup: int) -> list[Shard]:
    """Fixed chunks of about ``shard_frames`` and ``warmup`` frames of overlap, both rounded up to whole
    batches (the batches then match a single run's)."""
    step = -(-max(shard_frames, 1) // batch) * batch
    warm = -(-max(warmup, 0) // batch) * batch
    return [Shard(job, i, s, min(s + step, frames), min(warm, s)) for i, s in enumerate(range(0, frames, step))]


class RangeSource(VideoSource):
    """A :class:`VideoSource` over ``count`` frames from the one stamped ``from_pts`` (seek, then decode on)."""

    def __init__(self, path, from_pts: int, count: int, **kw):
        self._from_pts, self._count = from_pts, count
        super().__init__(path, **kw)

    def _decode(self):
        st, n = self._stream, 0
        self._container.seek(self._from_pts, stream=st, backward=True)
        for frame in self._container.decode(st):
            if frame.pts is None or frame.pts < self._from_pts:
                continue  # between the keyframe and the shard's first frame
            self.pts.append(frame.pts)
            n += 1
            yield frame
            if n >= self._count:
                return


_MODELS: dict = {}  # a worker process keeps its loaded model for the next shard it gets
_ENGINES: dict = {}  # ... and its engine (compiled functions, CUDA graphs: ~13 s to set up warm on an H100)


def _drop_engines() -> None:
    for engine in _ENGINES.values():
        engine.close()  # before another engine patches the shared U-Net or the models go
    _ENGINES.clear()


def _engine(models, config):
    """The worker's engine for ``config`` on ``models``, restarted (its outputs equal a fresh engine's)."""
    from ..engine.stream import StreamEngine

    key = (id(models), repr(config))
    if key in _ENGINES:
        _ENGINES[key].restart()
    else:
        _drop_engines()
        _ENGINES[key] = StreamEngine(models, config)
    return _ENGINES[key]


def _models(model: str, revision, device: str | None, dtype: str | None):
    import torch

    from ..models.loading import demo_available, load_models

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, dtype or ("bfloat16" if device.startswith("cuda") else "float32"))
    if model == "demo" and not demo_available():
        model = "random:tiny"
    key = (model, revision, device, dtype)
    if key not in _MODELS:
        _drop_engines()
        _MODELS.clear()
        _MODELS[key] = load_models(model, device=device, dtype=dtype, revision=revision)
    return _MODELS[key]


def _injected_failure(shard: Shard) -> None:
    """Test hook: ``STREAMEDIT_TEST_FAIL_SHARD=JOB:INDEX:MARKER`` kills the worker on that shard's first try
    (the marker file records the try), so the test sees Ray retry it."""
    spec = os.environ.get("STREAMEDIT_TEST_FAIL_SHARD")
    if spec:
        job, index, marker = spec.split(":", 2)
        if (int(job), int(index)) == (shard.job, shard.index) and not os.path.exists(marker):
            Path(marker).touch()
            os._exit(3)  # a crashed worker, as a lost node or an OOM kill looks to Ray


def stylize_shard(shard: Shard, spec: dict, progress=None) -> bytes:
    """Stylize one shard and return its encoded file (the output's container, no audio). ``spec``: path,
    from_pts, suffix, size, keep_size, crop, crf, encoder_preset, model, revision, device, dtype, config (an
    EngineConfig). ``progress``: an actor whose ``set(key, frames)`` hears the frames kept so far."""
    from ..video.io import VideoWriter

    _injected_failure(shard)
    models = _models(spec["model"], spec["revision"], spec["device"], spec["dtype"])
    source = RangeSource(spec["path"], spec["from_pts"], shard.end - shard.first, size=spec["size"],
                         keep_size=spec["keep_size"], crop=spec["crop"])
    config = spec["config"]
    config.frame_size = (source.info.height, source.info.width)
    engine = _engine(models, config)
    tmp = Path(tempfile.mkdtemp(prefix="streamedit-shard-"))
    key, kept = (shard.job, shard.index), 0
    try:
        engine.skip_noise(shard.first)
        with VideoWriter(tmp / f"shard{spec['suffix']}", source, crf=spec["crf"], preset=spec["encoder_preset"],
                         audio=False) as writer:
            for i, frame in enumerate(engine.run(source.frames(ahead=READ_AHEAD))):
                if i < shard.warm:
                    continue
                writer.write(frame, pts=source.pts[i])
                kept += 1
                if progress is not None and (kept % 4 == 0 or i == shard.end - shard.first - 1):
                    progress.set.remote(key, kept)
        if kept != shard.end - shard.start:
            raise RuntimeError(f"shard {shard.index} of {spec['path']}: decoded {kept} frames, "
                               f"expected {shard.end - shard.start}")
        return (tmp / f"shard{spec['suffix']}").read_bytes()
    except BaseException:
        _drop_engines()  # a run that failed part-way: the next shard builds a fresh engine
        raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
