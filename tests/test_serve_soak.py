"""Soak of `streamedit serve` on CPU (issue 25, Reliability), bounded for CI; run alone with
``python -m pytest -q tests/test_serve_soak.py`` (``STREAMEDIT_SOAK_JOINS`` changes the number of joins).

One long-lived session streams the whole time while churning sessions join and leave, two at a time (3 concurrent
streams), each doing one of: stream then leave politely (DELETE), vanish mid-stream (peer connection closed at a
random moment, also before it is up), send corrupted VP8 packets, send frames whose size jumps around (1x1 up),
send a frame over the server's pixel limit (refused: its session ends), flood malformed data-channel messages, or
offer and never connect. Afterwards: no session, peer connection, engine stream, Session or track object left,
threads back to the baseline, RSS growth bounded, and every well-behaved stream got frames throughout.
"""

from __future__ import annotations

import asyncio
import gc
import json
import os
import random
import threading
import time

import pytest
import torch

pytest.importorskip("aiortc")
import aiortc.rtcrtpsender
from aiohttp.test_utils import TestClient, TestServer
from aiortc import RTCPeerConnection

from streamedit.serve.client import Client, SyntheticCamera
from streamedit.serve.runtime import engine_factory
from streamedit.serve.server import Server, ServerConfig
from streamedit.serve.session import Session
from streamedit.serve.tracks import StylizedTrack

# 200 joins took 94 s on the 2-core box (shared, load average 8): CI runs 100 (~45 s); the full 200 with
# STREAMEDIT_SOAK_JOINS=200
JOINS = int(os.environ.get("STREAMEDIT_SOAK_JOINS", "100"))
CHURN = 2  # churning sessions at once, besides the long-lived one: 3 concurrent streams
# Measured RSS growth (allocator high-water, flattening out): 19 MiB after 8 joins, 44 after 36, 58 after 200.
# A leak grows with the joins: the second half of the run may add at most SECOND_HALF_MIB.
RSS_TOLERANCE_MIB, SECOND_HALF_MIB = 96, 24
BEHAVIOURS = tuple(os.environ.get("STREAMEDIT_SOAK_BEHAVIOURS", "leave,leave,vanish,vanish,corrupt,resize,huge,messages,ghost").split(","))


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def pool_thread(t: threading.Thread) -> bool:
    """Threads of bounded executor pools (asyncio's default executor, aiortc's encoders): they idle, not leak."""
    return t.name.startswith(("ThreadPoolExecutor", "asyncio_"))


class OddCamera(SyntheticCamera):
    """Frames whose size jumps around, down to 1x1 (the server fits each to the session's working size)."""

    SIZES = ((64, 64), (1, 1), (17, 9), (2, 2), (90, 30), (31, 63))

    def make_frame(self, n):
        import av
        import numpy as np

        w, h = self.SIZES[n % len(self.SIZES)]
        return av.VideoFrame.from_ndarray(np.full((h, w, 3), (n * 37) % 256, np.uint8), format="rgb24")


class CorruptCamera(SyntheticCamera):
    def make_frame(self, n):
        frame = super().make_frame(n)
        frame.opaque = "corrupt"  # the encoder wrapper below mangles this frame's packets
        return frame


class CorruptingEncoder:
    def __init__(self, inner, rng: random.Random):
        self.inner, self.rng = inner, rng

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def encode(self, frame, force_keyframe=False):
        payloads, timestamp = self.inner.encode(frame, force_keyframe)
        if getattr(frame, "opaque", None) != "corrupt":
            return payloads, timestamp
        out = []
        for p in payloads:
            p = bytearray(p)
            if self.rng.random() < 0.5:
                del p[max(2, len(p) // 2):]  # truncated
            for _ in range(8):  # garbage after the VP8 payload descriptor
                p[self.rng.randrange(min(2, len(p) - 1), len(p))] = self.rng.randrange(256)
            out.append(bytes(p))
        return out, timestamp


@pytest.mark.timeout(600)
def test_soak_joins_leaves_disconnects_and_malformed_input(tiny_models, monkeypatch):
    rng = random.Random(25)
    # session threads of earlier tests in this process (not this server's): see the report's note
    earlier = frozenset(t.name for t in threading.enumerate() if t.name.startswith("streamedit-session-"))
    real_get_encoder = aiortc.rtcrtpsender.get_encoder
    monkeypatch.setattr(aiortc.rtcrtpsender, "get_encoder", lambda codec: CorruptingEncoder(real_get_encoder(codec),
                                                                                             rng))
    threads_before = torch.get_num_threads()
    torch.set_num_threads(1)  # as `serve` on 2 cores: torch's spinning threads would starve the codecs
    factory = engine_factory(tiny_models, shared=True, max_streams=8, te_size=256)
    threads0 = None
    result: dict = {"behaviours": {b: 0 for b in BEHAVIOURS}, "starved": [], "busy": 0}

    async def post_json(http, path, data):
        resp = await http.post(path, json=data)
        return resp.status, await resp.json()

    async def join(http, camera, **params) -> Client | None:
        client = Client(camera)
        client.keep_pixels = False
        for _ in range(100):  # a slot freed by a vanished peer comes back when the server notices
            status, body = await client.offer(lambda p, d: post_json(http, p, d), size=64, **params)
            if status != 503:
                break
            result["busy"] += 1
            await asyncio.sleep(0.1)
        assert status == 200, body
        return client

    async def churner(http, server, behaviour: str) -> None:
        result["behaviours"][behaviour] += 1
        fps = 15
        if behaviour == "ghost":  # offers, never applies the answer: the connect timeout frees the slot
            ghost = Client(SyntheticCamera(64, 64, fps))
            await ghost.pc.setLocalDescription(await ghost.pc.createOffer())
            resp = await http.post("/offer", json={"sdp": ghost.pc.localDescription.sdp, "type": "offer"})
            assert resp.status in (200, 503)
            await ghost.close()
            return
        camera = {"corrupt": CorruptCamera(64, 64, fps), "resize": OddCamera(64, 64, fps),
                  "huge": SyntheticCamera(160, 160, fps)}.get(behaviour) or SyntheticCamera(64, 64, fps, rng.randrange(9))
        client = await join(http, camera, prompt=rng.choice(("oil painting", "watercolor", "sketch")))
        try:
            if behaviour == "vanish":
                await asyncio.sleep(rng.uniform(0, 1.5))  # before the connection is up, or mid-stream
            elif behaviour == "huge":
                await client.wait(lambda: any(m.get("type") == "error" for m in client.messages), 20, "the refusal")
            elif behaviour == "messages":
                await client.wait(lambda: client.channel.readyState == "open", 20, "the data channel")
                for msg in ("", "{", "[]", '{"type": "prompt", "prompt": 5}', "x" * 9000, b"\x00\xff"):
                    client.channel.send(msg)
                await asyncio.sleep(0.3)
            else:  # leave / corrupt / resize: stream a little; well-behaved ones must get frames
                t = time.monotonic()
                try:
                    await client.wait(lambda: len(client.arrivals) >= 2, 20, "frames")
                except TimeoutError:
                    if behaviour == "leave":
                        result["starved"].append(("churner", behaviour))
                await asyncio.sleep(max(0.0, rng.uniform(0.2, 1.0) - (time.monotonic() - t)))
                if behaviour == "leave":
                    resp = await http.delete(f"/session/{client.session}")
                    assert resp.status in (200, 404)
        finally:
            await client.close()

    async def go():
        nonlocal threads0
        server = Server(ServerConfig(ice_hosts=["127.0.0.1"], size=64, max_sessions=4, max_input_pixels=128 * 128,
                                     connect_timeout=3.0), factory)
        http = TestClient(TestServer(server.app(), host="127.0.0.1"))
        await http.start_server()
        try:
            # warm-up: three sessions at once fill the pools (executors, the engine's thread) to their working size
            warm = [await join(http, SyntheticCamera(64, 64, 15, k)) for k in range(3)]
            for c in warm:
                await c.wait(lambda c=c: len(c.arrivals) >= 3, 120, "warm-up frames")
            for c in warm:
                await http.delete(f"/session/{c.session}")
            await asyncio.gather(*(c.close() for c in warm))
            await wait_until(lambda: not left_over(server, factory, earlier), 60, "warm-up sessions to close",
                             lambda: left_over(server, factory, earlier))
            del warm
            gc.collect()
            threads0 = [t.name for t in threading.enumerate() if not pool_thread(t)]
            rss0 = rss_mib()
            t_start = time.monotonic()
            survivor = await join(http, SyntheticCamera(64, 64, 10, 8))
            await survivor.wait(lambda: survivor.arrivals, 60, "the survivor's first frame")
            t_churn = time.monotonic()

            slots = asyncio.Semaphore(CHURN)

            done = []

            async def one(i):
                async with slots:
                    await churner(http, server, BEHAVIOURS[i % len(BEHAVIOURS)])
                done.append(i)
                if len(done) == JOINS // 2:
                    gc.collect()
                    result["rss_mid_mib"] = round(rss_mib(), 1)

            order = list(range(JOINS))
            rng.shuffle(order)
            await asyncio.gather(*(one(i) for i in order))
            t_end = time.monotonic()
            stamps = [t for t, _ in survivor.arrivals if t >= t_churn] + [t_end]
            gaps = [b - a for a, b in zip([t_churn, *stamps], stamps)]
            result["survivor"] = {"frames": len(stamps) - 1, "max_gap_s": round(max(gaps), 2),
                                  "fps": round((len(stamps) - 1) / (t_end - t_churn), 1)}
            result["churn_s"] = round(t_end - t_churn, 1)
            await survivor.close()
            await wait_until(lambda: not left_over(server, factory, earlier), 60, "every session to close",
                             lambda: left_over(server, factory, earlier))
            result["engine_streams"] = len(factory.shared().engine.streams)
            result["refused"] = dict(server.refused)
        finally:
            await http.close()
        survivor = None  # drop the last reference before counting live objects
        # the asyncio loop is still alive here (aiortc's transports end on it): let them finish
        await asyncio.sleep(1.0)
        gc.collect()
        result["rss_mib"] = (round(rss0, 1), round(rss_mib(), 1))
        result["total_s"] = round(time.monotonic() - t_start, 1)

    def _still_alive() -> list:
        """The sessions' objects gc still finds, after up to 10 s for pool threads to let go of their last
        work item (a leak never goes; a slow thread does)."""
        deadline = time.monotonic() + 10
        while True:
            gc.collect()
            live = [o for o in gc.get_objects() if isinstance(o, (Session, StylizedTrack, RTCPeerConnection))]
            if not live or time.monotonic() > deadline:
                return live
            del live
            time.sleep(0.25)

    def _holders(live: list) -> list[str]:  # what keeps them: for the failure message
        return sorted({type(r).__name__ for o in live for r in gc.get_referrers(o) if r is not live})[:20]

    try:
        asyncio.run(asyncio.wait_for(go(), 540))
        gc.collect()
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            names = [t.name for t in threading.enumerate() if not pool_thread(t)]
            if len([n for n in names if n not in earlier]) <= len([n for n in threads0 if n not in earlier]):
                break
            time.sleep(0.2)
        result["threads"] = (len(threads0), len(names))
        print("soak:", json.dumps(result))
        live = _still_alive()
        assert not live, f"still alive: {[type(o).__name__ for o in live]}, held by {_holders(live)}"
        assert result["engine_streams"] == 0, result
        assert set(names) - earlier == set(threads0) - earlier and len(names) - len(set(names) & earlier) == len(
            threads0) - len(set(threads0) & earlier), f"threads now {names}, before {threads0}"
        assert not result["starved"], result
        # the long-lived stream kept producing: never 3 s without a frame while the others came and went
        assert result["survivor"]["max_gap_s"] < 3.0 and result["survivor"]["fps"] > 1, result
        rss0, rss1 = result["rss_mib"]
        assert rss1 - rss0 < RSS_TOLERANCE_MIB and rss1 - result["rss_mid_mib"] < SECOND_HALF_MIB, result
        assert result["refused"]["messages"] >= 5 * result["behaviours"]["messages"], result
    finally:
        factory.close()
        torch.set_num_threads(threads_before)


def left_over(server: Server, factory, ignore=frozenset()) -> dict:
    """Sessions, peer connections, offers in negotiation, session threads and engine streams still there."""
    shared = factory.shared()
    out = {"sessions": len(server.sessions), "pcs": len(server.pcs), "pending": server.pending,
           "session_threads": [t.name for t in threading.enumerate()
                               if t.name.startswith("streamedit-session-") and t.name not in ignore],
           "engine_streams": len(shared.engine.streams) if shared is not None else 0}
    return {k: v for k, v in out.items() if v}


async def wait_until(predicate, timeout: float, what: str, state=None) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout}s waiting for {what}" + (f": {state()}" if state else ""))
        await asyncio.sleep(0.1)
