"""A Python WebRTC client (aiortc) for `streamedit serve`: a synthetic camera with a distinct pattern per
session, a session that records every frame it gets back, and the server's per-frame trace.

The trace: a client that offers with ``"trace": true`` gets, on its data channel, ``{"type": "trace",
"frames": [[output pts, input pts, prompt], ...]}`` for the frames the server sent, so every received frame
can be matched to the camera frame it was made from and to the prompt that made it. End-to-end latency is
exact and needs only the client's clock: capture and arrival are both timed here.
"""

from __future__ import annotations

import asyncio
import colorsys
import fractions
import json
import time

import av
import numpy as np
from aiortc import (
    RTCPeerConnection,
    RTCSessionDescription,
    VideoStreamTrack,
)
from aiortc.mediastreams import MediaStreamError

from .network import rtc_configuration
from .rtp import decode_on_marker
from .session import to_yuv420p

PTS_SLACK = 3  # 90 kHz ticks: pts survive aiortc's RTP round trips to within a tick or two
KEEP_PIXELS = 300  # received frames kept with their pixels (tests look at recent ones)


def pattern_colour(k: int) -> tuple[int, int, int]:
    """Pattern ``k``'s dominant colour: hues a golden ratio apart, so any few sessions look unlike each other."""
    r, g, b = colorsys.hsv_to_rgb((k * 0.618034) % 1.0, 0.8, 0.9)
    return round(r * 255), round(g * 255), round(b * 255)


class SyntheticCamera(VideoStreamTrack):
    """Pattern ``pattern`` at ``fps``: its own colour, a moving shade and a moving square in the complementary
    colour. Frame ``n`` is :meth:`image` ``(n)``; :attr:`captured` maps each sent pts to its capture time."""

    def __init__(self, width: int = 640, height: int = 480, fps: float = 30.0, pattern: int = 0):
        super().__init__()
        self.width, self.height, self.fps, self.pattern = width, height, fps, pattern
        self.captured: dict[int, float] = {}
        self.sent = 0
        self.colour = np.array(pattern_colour(pattern), np.float32)
        self._x = np.arange(width, dtype=np.float32) * (2 * np.pi / max(width, 1))
        self._yshade = (0.75 + 0.25 * np.cos(np.arange(height, dtype=np.float32) * (np.pi / max(height, 1))))

    def image(self, n: int) -> np.ndarray:
        """RGB frame ``n`` (a pure function of the pattern, the size and ``n``)."""
        h, w, k = self.height, self.width, self.pattern
        shade = 0.55 + 0.45 * np.sin(self._x + 0.2 * n + k)
        img = (self.colour * (self._yshade[:, None] * shade[None, :])[..., None]).astype(np.uint8)
        s = max(2, min(h, w) // 4)
        x, y = (4 * n + 17 * k) % max(1, w - s), (k * s // 2) % max(1, h - s)
        img[y:y + s, x:x + s] = 255 - self.colour.astype(np.uint8)
        return img

    def make_frame(self, n: int) -> av.VideoFrame:
        # handed to VP8 already in its format: on the GPU host the load generator shares the CPUs with the server
        return to_yuv420p(self.image(n))

    async def recv(self):
        pts, time_base = await self.next_timestamp()
        frame = self.make_frame(self.sent)
        frame.pts, frame.time_base = pts, time_base
        self.captured[pts] = time.monotonic()
        self.sent += 1
        return frame

    async def next_timestamp(self):
        # aiortc's default paces at 30 fps; honour ``fps`` instead
        if not hasattr(self, "_t0"):
            self._t0, self._n = time.monotonic(), 0
        else:
            self._n += 1
            await asyncio.sleep(max(0.0, self._t0 + self._n / self.fps - time.monotonic()))
        return int(self._n * 90000 / self.fps), self._time_base

    _time_base = fractions.Fraction(1, 90000)


class Client:
    """One WebRTC session; ``offer(post, ...)`` starts it through ``post(path, json) -> (status, body)``."""

    def __init__(self, camera: SyntheticCamera | None = None, ice_servers: list[dict] | None = None):
        """``ice_servers``: the server's ``GET /ice-servers`` list, as the page uses it (None: host candidates)."""
        self.camera = camera or SyntheticCamera(320, 240, 15)
        self.pc = RTCPeerConnection(rtc_configuration(ice_servers))
        self.channel = self.pc.createDataChannel("control")
        self.messages: list[dict] = []
        self.frames: list[tuple[float, int, np.ndarray | None]] = []  # recent (received at, pts, rgb or None)
        self.arrivals: list[tuple[float, int]] = []  # every (received at, pts)
        self.trace: dict[int, tuple[int, str | None]] = {}  # server output pts -> (input pts, prompt)
        self.keep_pixels = True
        self.session: str | None = None
        self.on_frame = None  # optional callable(received_at, pts)
        self.channel.on("message", self._on_message)
        self.pc.addTransceiver(self.camera, direction="sendrecv")
        self._reader = None
        self.pc.on("track", self._on_track)

    def _on_track(self, track) -> None:
        if track.kind == "video" and self._reader is None:
            decode_on_marker(self.pc, track)  # as a browser does: a frame is shown when its last packet is in
            self._reader = asyncio.ensure_future(self._read(track))

    def _on_message(self, message) -> None:
        msg = json.loads(message)
        if msg.get("type") == "trace":
            for out_pts, in_pts, prompt in msg["frames"]:
                self.trace[out_pts] = (in_pts, prompt)
            return
        self.messages.append(msg)
        if len(self.messages) > 2000:
            del self.messages[:1000]

    async def _read(self, track) -> None:
        try:
            while True:
                frame = await track.recv()
                now = time.monotonic()
                rgb = frame.to_ndarray(format="rgb24") if self.keep_pixels else None
                self.arrivals.append((now, frame.pts))
                self.frames.append((now, frame.pts, rgb))
                if self.on_frame is not None:
                    self.on_frame(now, frame.pts)
                if len(self.frames) > KEEP_PIXELS:
                    del self.frames[:100]
        except MediaStreamError:
            pass

    async def offer(self, post, **params) -> tuple[int, dict]:
        await self.pc.setLocalDescription(await self.pc.createOffer())
        status, body = await post("/offer", {"sdp": self.pc.localDescription.sdp, "type": "offer", **params})
        if status == 200:
            self.session = body["session"]
            await self.pc.setRemoteDescription(RTCSessionDescription(sdp=body["sdp"], type=body["type"]))
        return status, body

    def stats(self) -> dict | None:
        return next((m for m in reversed(self.messages) if m.get("type") == "stats"), None)

    def traced(self, pts: int) -> tuple[int, str | None] | None:
        """(input pts, prompt) of the received frame with ``pts``, once the server's trace has it."""
        return lookup(self.trace, pts)

    def captured_at(self, in_pts: int) -> float | None:
        return lookup(self.camera.captured, in_pts)

    async def wait(self, predicate, timeout: float, what: str):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate():
                return
            await asyncio.sleep(0.05)
        raise TimeoutError(f"timed out after {timeout}s waiting for {what}")

    async def close(self) -> None:
        await self.pc.close()
        if self._reader is not None:
            self._reader.cancel()
            await asyncio.gather(self._reader, return_exceptions=True)


def lookup(table: dict, pts: int):
    for d in (0, -1, 1, -2, 2, -3, 3)[:2 * PTS_SLACK + 1]:
        if pts + d in table:
            return table[pts + d]
    return None


async def connect(http_client, **params) -> tuple[Client, int, dict]:
    """Start a session through an ``aiohttp`` test client (or anything with ``.post(path, json=)``)."""

    async def post(path, data):
        resp = await http_client.post(path, json=data)
        return resp.status, await resp.json()

    client = Client(params.pop("camera", None))
    status, body = await client.offer(post, **params)
    return client, status, body
