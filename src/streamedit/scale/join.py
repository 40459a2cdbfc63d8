"""Join finished shard files into one output without re-encoding, with the source's audio muxed once.

The shards' packets are copied in order (PyAV packet copy: no decoder, no encoder), each shard's timestamps
moved so its first frame sits at the source timestamp of that frame, whatever the shard's container did with
its start. The audio of the source is copied alongside (re-encoded only where the output's container cannot
hold its codec), cut at the end of the last frame unless the shards cover the whole source. The output is
written as ``VideoWriter`` writes it: a hidden file beside it, renamed over it once complete.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
from fractions import Fraction
from pathlib import Path

import av

from ..errors import StreameditError
from ..video.io import _ffmpeg_reason, _open_input, _open_output, _signals_deferred, _temp_beside, check_output

log = logging.getLogger(__name__)


class _Audio:
    """The source's first audio track, muxed into ``out`` up to a time (copied, else re-encoded)."""

    def __init__(self, out, source: Path, suffix: str):
        self.inp = self.stream = None
        try:
            self.inp = _open_input(source)
            tracks = [s for s in self.inp.streams.audio if s.codec_context is not None]
            if not tracks:
                self.close()
                return
            src = tracks[0]
            try:
                self.stream, self.transcode = out.add_stream_from_template(src), False
            except ValueError:  # codec not allowed in this container
                codec = "libopus" if suffix == ".webm" else "aac"
                self.stream = out.add_stream(codec, rate=48000 if codec == "libopus" else src.rate,
                                             layout=src.layout.name)
                self.transcode = True
            self.packets, self.pending, self.out = self.inp.demux(src), None, out
        except (av.FFmpegError, OSError, ValueError) as e:
            log.warning("%s: dropping audio (%s)", source, _ffmpeg_reason(e))
            self.close()

    def mux_until(self, until: float | None) -> None:
        """Every packet that starts before ``until`` seconds (all if None)."""
        if self.stream is None:
            return
        while True:
            pkt, self.pending = self.pending or next(self.packets, None), None
            if pkt is None:
                break
            ts = pkt.pts if pkt.pts is not None else pkt.dts
            if until is not None and ts is not None and ts * pkt.time_base >= until:
                self.pending = pkt
                break
            if self.transcode:
                for frame in pkt.decode():
                    self.out.mux(self.stream.encode(frame))
            elif pkt.size and pkt.dts is not None:
                pkt.stream = self.stream
                self.out.mux(pkt)

    def finish(self, until: float | None) -> None:
        if self.stream is not None:
            self.mux_until(until)
            if self.transcode:
                self.out.mux(self.stream.encode(None))
        self.close()

    def close(self):
        if self.inp is not None:
            self.inp.close()
        self.inp = self.stream = None


def join(shards: list[Path], first_pts: list[int], time_base: Fraction, source: Path, output: Path,
         whole: bool) -> int:
    """Copy ``shards`` (files, in order) into ``output``; shard k's first frame gets timestamp ``first_pts[k]``
    (in ``time_base``, the source video's). ``whole``: the shards hold every source frame (all the audio is
    kept). Returns the number of video packets written."""
    final = check_output(output, source)
    tmp = _temp_beside(final)
    out = _open_output(output, source, target=tmp)
    written, ok = 0, False
    try:
        with av.open(str(shards[0])) as first:
            vout = out.add_stream_from_template(first.streams.video[0])
        audio = _Audio(out, source, output.suffix.lower())
        last_dts, end = None, None
        for path, start in zip(shards, first_pts):
            with av.open(str(path)) as c:
                st = c.streams.video[0]
                packets = [p for p in c.demux(st) if p.size]
                tb = st.time_base
                shift = round(start * time_base / tb) - min(p.pts for p in packets)
                for p in packets:
                    p.pts += shift
                    p.dts = p.pts if p.dts is None else p.dts + shift
                    if last_dts is not None and p.dts <= last_dts:
                        p.dts = last_dts + 1
                    last_dts = p.dts
                    audio.mux_until(float(p.dts * tb))
                    frame_end = (p.pts + (p.duration or 0)) * tb
                    end = frame_end if end is None else max(end, frame_end)
                    p.stream = vout
                    out.mux(p)
                    written += 1
        audio.finish(None if whole else float(end))
        ok = True
    except (OSError, av.FFmpegError) as e:
        raise StreameditError(f"cannot join the shards into {output}: {_ffmpeg_reason(e)}") from None
    finally:
        with _signals_deferred():
            try:
                out.close()
            except (OSError, av.FFmpegError) as e:
                ok = False
                log.warning("%s: %s", output, _ffmpeg_reason(e))
            if ok:
                with contextlib.suppress(OSError):  # a replaced file keeps its permissions
                    shutil.copymode(final, tmp)
                os.replace(tmp, final)
            else:
                tmp.unlink(missing_ok=True)
    return written
