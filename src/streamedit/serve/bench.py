"""Measure `streamedit serve` on this machine: a Python WebRTC client (aiortc) on 127.0.0.1 sends a
synthetic camera, receives the stylized stream and reports served fps and latencies.

    python -m streamedit.serve.bench --model random:tiny --size 128 --seconds 30

End-to-end latency here is exact: client and server share one clock, the server keeps the input
frame's timestamp with every output frame (``ServerConfig.trace``), so each received frame is matched
to the moment its input was captured (capture -> encode -> network -> decode -> queue -> model ->
encode -> network -> decode). Also used by the tests as a ready-made client (:func:`connect`).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time

import av
import numpy as np
from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription, VideoStreamTrack
from aiortc.mediastreams import MediaStreamError


class SyntheticCamera(VideoStreamTrack):
    """A moving colour pattern at ``fps``; remembers when each pts was captured."""

    def __init__(self, width: int = 640, height: int = 480, fps: float = 30.0):
        super().__init__()
        self.width, self.height, self.fps = width, height, fps
        self.captured: dict[int, float] = {}
        self.sent = 0
        yy, xx = np.mgrid[0:height, 0:width]
        self._base = np.stack([(xx * 255 // max(width - 1, 1)), (yy * 255 // max(height - 1, 1)),
                               np.full_like(xx, 90)], -1).astype(np.uint8)

    async def recv(self):
        pts, time_base = await self.next_timestamp()
        img = np.roll(self._base, self.sent * 4, axis=1)
        s, x = self.height // 4, (self.sent * 6) % (self.width - self.height // 4)
        img[s:2 * s, x:x + s] = (250, 240, 40)
        frame = av.VideoFrame.from_ndarray(img, format="rgb24")
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

    _time_base = __import__("fractions").Fraction(1, 90000)


class Client:
    """One WebRTC session against the server at ``post`` (an async callable: path, json -> response)."""

    def __init__(self, camera: SyntheticCamera | None = None):
        self.camera = camera or SyntheticCamera(320, 240, 15)
        self.pc = RTCPeerConnection(RTCConfiguration(iceServers=[]))
        self.channel = self.pc.createDataChannel("control")
        self.messages: list[dict] = []
        self.frames: list[tuple[float, int, np.ndarray | None]] = []  # (received at, pts, rgb or None)
        self.keep_pixels = True
        self.session: str | None = None
        self.on_frame = None  # optional callable(received_at, pts)
        self.channel.on("message", lambda m: self.messages.append(json.loads(m)))
        self.pc.addTransceiver(self.camera, direction="sendrecv")
        self.pc.on("track", lambda track: asyncio.ensure_future(self._read(track)))

    async def _read(self, track) -> None:
        try:
            while True:
                frame = await track.recv()
                rgb = frame.to_ndarray(format="rgb24") if self.keep_pixels else None
                self.frames.append((time.monotonic(), frame.pts, rgb))
                if self.on_frame is not None:
                    self.on_frame(*self.frames[-1][:2])
                if len(self.frames) > 300:
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

    async def wait(self, predicate, timeout: float, what: str):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate():
                return
            await asyncio.sleep(0.05)
        raise TimeoutError(f"timed out after {timeout}s waiting for {what}")

    async def close(self) -> None:
        await self.pc.close()


async def connect(http_client, **params) -> tuple[Client, int, dict]:
    """Start a session through an ``aiohttp`` test client (or anything with ``.post(path, json=)``)."""

    async def post(path, data):
        resp = await http_client.post(path, json=data)
        return resp.status, await resp.json()

    client = Client(params.pop("camera", None))
    status, body = await client.offer(post, **params)
    return client, status, body


async def bench(model: str, size: int, seconds: float, width: int, height: int, fps: float, warmup: float,
                threads: int | None = None) -> dict:
    from aiohttp.test_utils import TestClient, TestServer

    from .runtime import engine_factory, load_runtime, set_cpu_threads
    from .server import Server, ServerConfig

    models = load_runtime(model)
    threads = set_cpu_threads(models, threads)
    server = Server(ServerConfig(ice_hosts=["127.0.0.1"], size=size, trace=True, model_name=model),
                    engine_factory(models))
    http = TestClient(TestServer(server.app(), host="127.0.0.1"))
    await http.start_server()
    client, status, body = await connect(http, size=size, camera=SyntheticCamera(width, height, fps))
    if status != 200:
        raise RuntimeError(body)
    client.keep_pixels = False
    session = server.sessions[client.session]
    await client.wait(lambda: len(client.frames) > 0, 120, "the first frame")
    await asyncio.sleep(warmup)
    start, n0 = time.monotonic(), session.stats.sent
    e2e = []

    def on_frame(received: float, pts: int) -> None:
        # pts survive the 90 kHz round trips to within a tick or two
        in_pts = next((i for o, i in reversed(session.trace) if abs(o - pts) <= 3), None)
        captured = next((t for p, t in client.camera.captured.items() if in_pts is not None and abs(p - in_pts) <= 3),
                        None)
        if captured is not None:
            e2e.append(received - captured)

    client.on_frame = on_frame
    await asyncio.sleep(seconds)
    elapsed = time.monotonic() - start
    snap = session.snapshot()
    await client.close()
    await http.close()
    return {
        "model": model, "device": str(models.device), "cpu_threads": threads, "size": size,
        "input": f"{width}x{height}@{fps:g}", "seconds": round(elapsed, 1),
        "served_fps": round((session.stats.sent - n0) / elapsed, 2),
        "e2e_ms_p50": round(1000 * float(np.median(e2e)), 1) if e2e else None,
        "e2e_ms_p95": round(1000 * float(np.quantile(e2e, 0.95)), 1) if e2e else None,
        "server_ms_p50": snap["latency_ms_p50"], "matched_frames": len(e2e),
        "received": snap["received"], "dropped": snap["dropped"],
    }


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="random:tiny")
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--seconds", type=float, default=30)
    ap.add_argument("--warmup", type=float, default=3)
    ap.add_argument("--input", default=None, help="WxH the client sends (default: 4:3 with short side = size, "
                    "what the page uploads)")
    ap.add_argument("--fps", type=float, default=30)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: as `serve`: half the cores)")
    args = ap.parse_args(argv)
    width, height = ((int(v) for v in args.input.split("x")) if args.input
                     else (round(args.size * 4 / 3) // 2 * 2, args.size))
    print(json.dumps(asyncio.run(bench(args.model, args.size, args.seconds, width, height, args.fps, args.warmup,
                                       args.threads))))


if __name__ == "__main__":
    main()
