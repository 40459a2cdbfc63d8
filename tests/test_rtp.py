"""serve/rtp.py: the video jitter buffer releases each frame at its marked last packet, with the bytes and
timestamps aiortc's own buffer releases a frame later; gaps, reordering and a lost marker are handled; end to end
(a real server and client, no model) a frame comes back within a frame interval, not two intervals later."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("aiortc")
from aiortc.jitterbuffer import JitterBuffer  # noqa: E402
from aiortc.rtp import RtpPacket  # noqa: E402

from streamedit.serve.rtp import FrameJitterBuffer  # noqa: E402


def stream(frames: int, seed: int = 0, start: int = 65530):
    """Packets of ``frames`` video frames (1-5 packets each, marker on the last), sequence numbers wrapping."""
    rng, seq, out = random.Random(seed), start, []
    for f in range(frames):
        n = rng.randint(1, 5)
        for i in range(n):
            p = RtpPacket(payload_type=96, marker=int(i == n - 1), sequence_number=seq % 65536,
                          timestamp=3000 * f, ssrc=1)
            p._data = bytes([f % 256, i]) * rng.randint(1, 4)
            out.append(p)
            seq += 1
    return out


def feed(buffer, packets):
    """(index of the packet whose arrival released it, timestamp, data) for every frame released."""
    out = []
    for k, p in enumerate(packets):
        _, frame = buffer.add(p)
        if frame is not None:
            out.append((k, frame.timestamp, frame.data))
    return out


def test_each_frame_is_released_at_its_last_packet_with_upstreams_bytes():
    packets = stream(40)
    ours, upstream = feed(FrameJitterBuffer(), packets), feed(JitterBuffer(512, is_video=True), packets)
    # upstream releases frame f when frame f+1 starts: the last frame never; ours at the marker, all 40
    assert [f[1:] for f in ours[:-1]] == [f[1:] for f in upstream] and len(ours) == 40
    last_packet = [k for k, p in enumerate(packets) if p.marker]
    assert [k for k, *_ in ours] == last_packet
    assert all(k_up == k + 1 for (k, *_), (k_up, *_) in zip(ours, upstream))


def test_reordered_packets_release_a_frame_once_its_gap_fills():
    packets = stream(30, seed=1)
    shuffled = packets[:]
    rng = random.Random(2)
    for i in range(0, len(shuffled) - 3, 3):  # swap neighbours now and then (markers included)
        if rng.random() < 0.5:
            shuffled[i], shuffled[i + 1] = shuffled[i + 1], shuffled[i]
    ours = feed(FrameJitterBuffer(), shuffled)
    expected = feed(FrameJitterBuffer(), packets)
    assert [f[1:] for f in ours] == [f[1:] for f in expected]  # same frames, same bytes, in order
    prev = -1
    for k, ts, _ in ours:  # released when its last missing packet arrives (one frame per arrival, as upstream)
        last = max(j for j, p in enumerate(shuffled) if p.timestamp == ts)
        assert k == max(last, prev + 1), (k, last, prev)
        prev = k


def test_a_lost_marker_falls_back_to_the_next_frames_timestamp():
    packets = stream(6, seed=3)
    lost = [p for p in packets if p.timestamp == 3000 * 2][-1]
    lost.marker = 0  # frame 2's last packet arrives without its marker
    ours = feed(FrameJitterBuffer(), packets)
    assert [ts for _, ts, _ in ours] == [3000 * f for f in range(6)]
    first_of_3 = next(k for k, p in enumerate(packets) if p.timestamp == 3000 * 3)
    assert ours[2][0] == first_of_3  # frame 2 came out when frame 3 began, as upstream would release it


def test_a_missing_packet_holds_its_frame_and_the_frames_after_it():
    packets = stream(5, seed=4)
    hole = next(k for k, p in enumerate(packets) if p.timestamp == 3000 * 1)
    ours = feed(FrameJitterBuffer(), packets[:hole] + packets[hole + 1:])
    assert [ts for _, ts, _ in ours] == [0]  # frame 1 is incomplete; nothing after it is handed on


@pytest.mark.timeout(240)
def test_the_media_path_returns_a_frame_within_one_interval_not_two(tmp_path):
    # scripts/serve_transport.py: `serve`'s server with an echo engine and the load generator, both ends on
    # FrameJitterBuffer or (--upstream-buffer) on aiortc's; at 10 fps one frame interval is 100 ms
    script = Path(__file__).resolve().parents[1] / "scripts" / "serve_transport.py"
    p50 = {}
    for upstream in (False, True):
        out = tmp_path / f"upstream-{upstream}.json"
        cmd = [sys.executable, str(script), "--size", "64", "--fps", "10", "--seconds", "4", "--json", str(out)]
        run = subprocess.run(cmd + ["--upstream-buffer"] * upstream, capture_output=True, text=True, timeout=180)
        assert run.returncode == 0, run.stderr[-2000:]
        session = json.loads(out.read_text())["sessions"][0]
        assert session["served_fps"] > 8, session
        p50[upstream] = session["e2e_ms_p50"]
    assert p50[False] < 60, p50  # codecs and loopback only: a few ms
    assert p50[True] > p50[False] + 100, p50  # aiortc's buffer: one interval per hop (two hops)
