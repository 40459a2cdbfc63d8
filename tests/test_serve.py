"""`streamedit serve`: HTTP API, security (token, host, origin, limits), WebRTC sessions from a Python
client (aiortc) on 127.0.0.1, malformed-input storms and session cleanup. The model is the tiny random
one on CPU (or a fake engine where only the plumbing matters)."""

from __future__ import annotations

import asyncio
import json
import re
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import cv2
import numpy as np
import pytest

pytest.importorskip("aiortc")
from aiohttp.test_utils import TestClient, TestServer  # noqa: E402
from conftest import close_clients, run_closing  # noqa: E402

from streamedit.serve.bench import SyntheticCamera, connect  # noqa: E402
from streamedit.serve.rtp import _ATTR as JITTER_ATTR, FrameJitterBuffer  # noqa: E402
from streamedit.serve.server import Server, ServerConfig, filter_candidates, is_loopback  # noqa: E402
from streamedit.serve.session import LatestQueue, check_prompt, square_resize  # noqa: E402

TOKEN = "s3cret-token-for-tests"


class FakeEngine:
    """Inverts colours and tints by prompt: visibly not the input, and a prompt change shows."""

    def __init__(self, prompt, size):
        self.prompt, self.size = prompt, size

    def set_prompt(self, prompt):
        self.prompt = prompt

    def process(self, frames):
        tint = sum(map(ord, self.prompt)) % 200
        return [np.clip(255 - f.astype(np.int16) + (tint, 0, 0), 0, 255).astype(np.uint8) for f in frames]


def fake_factory(prompt, size):
    return FakeEngine(prompt, size)


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 120))


async def start(factory=fake_factory, **cfg):
    server = Server(ServerConfig(ice_hosts=["127.0.0.1"], size=64, **cfg), factory)
    client = TestClient(TestServer(server.app(), host="127.0.0.1"))
    await client.start_server()
    return server, client


# ---- units -----------------------------------------------------------------------------------
def test_latest_queue_drops_oldest_and_counts():
    q = LatestQueue(2)
    for i in range(5):
        q.put(i)
    assert q.dropped == 3 and q.get_batch(4, 0) == [3, 4] and q.get_batch(1, 0.01) == []
    q.close()
    q.put(9)
    assert q.get_batch(1, 0) == []


def test_prompt_and_resize_helpers():
    assert check_prompt("  oil   painting ") == "oil painting"
    for bad in ("", "   ", None, 3, "x" * 501, "a\x00b"):
        with pytest.raises(ValueError):
            check_prompt(bad)
    out = square_resize(np.zeros((480, 640, 3), np.uint8), 128)
    assert out.shape == (128, 128, 3)
    assert is_loopback("127.0.0.1") and is_loopback("localhost") and is_loopback("::1")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.4")
    sdp = "v=0\r\na=candidate:1 1 udp 1 192.0.2.7 5000 typ host\r\na=candidate:2 1 udp 1 127.0.0.1 5001 typ host\r\n"
    kept = filter_candidates(sdp, ["127.0.0.1"])
    assert "127.0.0.1" in kept and "192.0.2.7" not in kept and filter_candidates(sdp, None) == sdp


# ---- HTTP and security -------------------------------------------------------------------------
def test_health_stats_and_page_on_localhost():
    async def go():
        server, client = await start()
        try:
            assert (await (await client.get("/health")).json())["status"] == "ok"
            stats = await (await client.get("/stats")).json()
            assert stats["sessions"] == [] and stats["max_sessions"] == 2 and "limits" in stats
            page = await client.get("/")
            assert page.status == 200 and "streamedit" in await page.text()
            assert (await client.get("/static/app.js")).status == 200
            # DNS rebinding: a foreign Host header is refused on a loopback server without token
            evil = await client.get("/stats", headers={"Host": "evil.example:7860"})
            assert evil.status == 403 and "not allowed" in (await evil.json())["error"]
            cross = await client.post("/offer", data="{}", headers={"Origin": "http://evil.example"})
            assert cross.status == 403 and "cross-origin" in (await cross.json())["error"]
        finally:
            await client.close()

    run(go())


def test_token_checked_on_page_api_and_offer():
    async def go():
        server, client = await start(token=TOKEN)
        try:
            assert (await client.get("/health")).status == 200  # liveness stays public
            page = await client.get("/")
            assert page.status == 401 and "token" in (await page.text()).lower()
            assert (await client.get(f"/?token={TOKEN}")).status == 200
            for path in ("/stats", "/stats?token=wrong"):
                resp = await client.get(path)
                assert resp.status == 401 and "token" in (await resp.json())["error"]
            assert (await client.get("/stats", headers={"X-Streamedit-Token": TOKEN})).status == 200
            assert (await client.get("/stats", headers={"Authorization": f"Bearer {TOKEN}"})).status == 200
            cam, status, body = await connect(client, size=64)  # a real offer, without the token
            await cam.close()
            assert status == 401 and server.sessions == {}
            assert (await client.post("/session/abc/prompt", json={"prompt": "x"})).status == 401
            assert server.refused["auth"] >= 5
        finally:
            await client.close()

    run(go())


@pytest.mark.timeout(120)
def test_cli_off_localhost_generates_token_and_refuses_without_it(tmp_path):
    """The real command bound to 0.0.0.0 (reached only via 127.0.0.1): a token is printed and required."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    code = "import sys; from streamedit.serve import serve_command; serve_command(sys.argv[1:])"
    proc = subprocess.Popen([sys.executable, "-c", code, "--host", "0.0.0.0", "--port", str(port), "--model",
                             "random:tiny", "--device", "cpu"], stderr=subprocess.PIPE, text=True)
    try:
        lines, token = [], None
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and token is None:
            line = proc.stderr.readline()
            assert line or proc.poll() is None, "".join(lines)
            lines.append(line)
            if m := re.search(r"open http://\S+/\?token=(\S+)", line):
                token = m.group(1)
        assert token and any("access token (generated)" in ln for ln in lines), "".join(lines)
        base = f"http://127.0.0.1:{port}"
        for _ in range(100):  # the server starts right after printing
            try:
                urllib.request.urlopen(f"{base}/health", timeout=2)
                break
            except OSError:
                time.sleep(0.1)
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(f"{base}/stats", timeout=5)
        assert err.value.code == 401
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(f"{base}/", timeout=5)
        assert err.value.code == 401
        ok = urllib.request.urlopen(urllib.request.Request(f"{base}/stats", headers={"X-Streamedit-Token": token}))
        assert json.loads(ok.read())["model"] == "random:tiny"
    finally:
        proc.terminate()
        proc.wait(20)


def test_limits_give_clear_refusals():
    async def go():
        server, client = await start(max_body_bytes=8192)
        try:
            big = await client.post("/offer", data="x" * 20000)
            assert big.status == 413 and "limit" in (await big.json())["error"]
            cam, status, body = await connect(client, size=1024)
            await cam.close()
            assert status == 400 and "'size' must be" in body["error"]
            cam, status, body = await connect(client, prompt="x" * 600)
            await cam.close()
            assert status == 400 and "500 characters" in body["error"]
        finally:
            await client.close()

    run(go())


# ---- sessions over WebRTC ----------------------------------------------------------------------
def test_session_streams_stylized_frames_and_changes_prompt(tiny_models):
    from streamedit.serve.runtime import engine_factory

    async def go():
        server, client = await start(engine_factory(tiny_models))
        cam, status, body = await connect(client, size=64, prompt="oil painting")
        try:
            assert status == 200, body
            await cam.wait(lambda: len(cam.frames) >= 3, 60, "3 stylized frames")
            _, _, out = cam.frames[-1]
            assert out.shape == (64, 64, 3)
            for pc in (cam.pc, server.pcs[cam.session]):  # both ends decode a frame at its last packet
                video = [t.receiver for t in pc.getTransceivers() if t.kind == "video"]
                assert [type(getattr(r, JITTER_ATTR)) for r in video] == [FrameJitterBuffer]
            src = square_resize(cam.camera.image(0), 64)
            assert np.abs(out.astype(int) - src).mean() > 10, "output looks like the input"
            cam.channel.send(json.dumps({"type": "prompt", "prompt": "watercolor"}))
            await cam.wait(lambda: (cam.stats() or {}).get("active_prompt") == "watercolor"
                           and cam.stats()["prompt_switch_frames"] is not None, 60, "the new prompt")
            assert cam.stats()["prompt_switch_frames"] <= 3, cam.stats()
            http = await client.post(f"/session/{cam.session}/prompt", json={"prompt": "pencil sketch"})
            assert http.status == 200
            await cam.wait(lambda: cam.stats()["active_prompt"] == "pencil sketch", 60, "the HTTP prompt")
            await cam.wait(lambda: cam.stats()["fps"] > 0 and cam.stats()["latency_ms_p50"], 30, "fps and latency")
            stats = (await (await client.get("/stats")).json())["sessions"][0]
            assert stats["fps"] > 0 and stats["latency_ms_p50"] > 0 and stats["sent"] >= 3, stats
        finally:
            await cam.close()
            await client.close()

    run(go())


def test_three_sessions_share_one_engine(tiny_models):
    """The shared engine (serve's default): three WebRTC sessions with their own prompts each receive stylized
    frames from one multi-stream engine, which batches their frames together (per-stream content:
    tests/test_multistream.py)."""
    from streamedit.serve.runtime import engine_factory

    factory = engine_factory(tiny_models, shared=True, max_streams=3)

    async def go():
        server, client = await start(factory, max_sessions=3)
        cams = []
        try:
            for prompt in ("oil painting", "watercolor", "pencil sketch"):
                cam, status, body = await connect(client, size=64, prompt=prompt)
                cams.append(cam)
                assert status == 200, body
            for cam in cams:
                await cam.wait(lambda: len(cam.frames) >= 3, 90, "3 stylized frames")
                assert cam.frames[-1][2].shape == (64, 64, 3)
            stats = (await (await client.get("/stats")).json())["sessions"]
            assert sorted(s["active_prompt"] for s in stats) == ["oil painting", "pencil sketch", "watercolor"]
            engine = factory.shared().engine
            assert len(engine.streams) == 3 and max(engine.histogram) > 1, engine.report()
        finally:
            await close_clients(cams, client)

    run_closing(run, go(), factory)


def test_session_limit_refuses_clearly_and_frees_on_disconnect():
    async def go():
        server, client = await start(max_sessions=1)
        first, status, _ = await connect(client)
        try:
            assert status == 200
            await first.wait(lambda: len(first.frames) >= 2, 30, "frames")
            second, status, body = await connect(client)
            await second.close()
            assert status == 503 and "1 of 1 sessions in use" in body["error"]
            await first.close()  # the browser goes away: the server notices and frees the slot
            deadline = time.monotonic() + 20
            while server.sessions and time.monotonic() < deadline:
                await asyncio.sleep(0.1)
            assert server.sessions == {}
            third, status, body = await connect(client)
            assert status == 200, body
            await third.wait(lambda: len(third.frames) >= 2, 30, "frames of the new session")
            stop = await client.delete(f"/session/{third.session}")
            assert stop.status == 200 and server.sessions == {}
            await third.close()
        finally:
            await first.close()
            await client.close()

    run(go())


def test_oversized_input_is_refused_on_its_session_only():
    async def go():
        server, client = await start(max_input_pixels=100 * 100)
        cam, status, _ = await connect(client, camera=SyntheticCamera(320, 240, 15))
        try:
            assert status == 200
            await cam.wait(lambda: any(m["type"] == "error" for m in cam.messages), 30, "the refusal")
            err = next(m for m in cam.messages if m["type"] == "error")["error"]
            assert "320x240" in err and "limit" in err
            await cam.wait(lambda: not server.sessions, 10, "the session to close")
        finally:
            await cam.close()
            await client.close()

    run(go())


def test_an_error_said_before_the_data_channel_opens_reaches_the_client_when_it_opens():
    # a camera frame can be decoded before the client's data channel is up: the refusal must wait for it
    class Channel:
        readyState, bufferedAmount = "connecting", 0

        def __init__(self):
            self.sent = []

        def send(self, text):
            self.sent.append(json.loads(text))

    async def go():
        server = Server(ServerConfig(ice_hosts=["127.0.0.1"], size=64), fake_factory)
        ended = []
        server._end = ended.append
        session = type("S", (), {"id": "s1", "channel": None, "outbox": [], "error": "too big"})()
        assert not server._send(session, {"type": "stats"})  # not held: stats are dropped
        assert not server._send(session, {"type": "error", "error": "too big"}, hold=True)
        session.channel = channel = Channel()
        server._flush(session)  # the channel exists but is not open yet
        assert channel.sent == [] and ended == []
        channel.readyState = "open"
        server._flush(session)
        assert channel.sent == [{"type": "error", "error": "too big"}] and session.outbox == []
        assert ended == ["s1"]  # told, then ended

    run(go())


@pytest.mark.timeout(300)
def test_1000_malformed_offers_and_messages_leave_a_healthy_server():
    valid_sdp_head = ("v=0\r\no=- 1 1 IN IP4 127.0.0.1\r\ns=-\r\nt=0 0\r\nm=video 9 UDP/TLS/RTP/SAVPF 96\r\n"
                      "c=IN IP4 0.0.0.0\r\na=sendrecv\r\na=rtpmap:96 VP8/90000\r\n")
    bad_bodies = [b"", b"not json", b"[1,2]", b"{\"type\": \"offer\"}", b"{\"sdp\": 5, \"type\": \"offer\"}",
                  json.dumps({"sdp": "v=0 garbage", "type": "offer"}).encode(),
                  json.dumps({"sdp": valid_sdp_head + "a=garbage\r\n", "type": "offer"}).encode(),
                  json.dumps({"sdp": valid_sdp_head.replace("sendrecv", "recvonly"), "type": "offer"}).encode(),
                  json.dumps({"sdp": valid_sdp_head + "a=setup:actpass\r\na=ice-ufrag:x\r\n", "type": "offer"}).encode(),
                  json.dumps({"sdp": valid_sdp_head, "type": "answer"}).encode(),
                  json.dumps({"sdp": valid_sdp_head, "type": "offer", "size": "big"}).encode(),
                  json.dumps({"sdp": valid_sdp_head, "type": "offer", "prompt": ["x"]}).encode(),
                  b"{" * 5000, b"\xff\xfe\x00garbage"]
    bad_messages = ["", "not json", "[]", "{}", '{"type": "prompt"}', '{"type": "prompt", "prompt": 7}',
                    '{"type": "prompt", "prompt": "a\\u0000b"}', '{"type": "nope"}', "x" * 5000, b"\x00\x01binary",
                    '{"type": "prompt", "prompt": "' + "y" * 800 + '"}', "[" * 3000]

    async def go():
        server, client = await start(max_sessions=2)
        healthy, status, _ = await connect(client)
        try:
            assert status == 200
            await healthy.wait(lambda: len(healthy.frames) >= 2, 30, "frames")
            for i in range(0, 500, 50):  # 500 malformed offers, 50 at a time
                resps = await asyncio.gather(*(client.post("/offer", data=bad_bodies[j % len(bad_bodies)])
                                               for j in range(i, i + 50)))
                assert all(r.status == 400 for r in resps), {r.status for r in resps}
            for j in range(500):  # 500 malformed data-channel messages on the live session
                healthy.channel.send(bad_messages[j % len(bad_messages)])
                if j % 50 == 0:
                    await asyncio.sleep(0.01)
            await healthy.wait(lambda: sum(m["type"] == "error" for m in healthy.messages) >= 500, 30, "500 refusals")
            n = len(healthy.frames)
            await healthy.wait(lambda: len(healthy.frames) >= n + 3, 30, "frames after the storm")
            healthy.channel.send(json.dumps({"type": "prompt", "prompt": "still works"}))
            await healthy.wait(lambda: healthy.stats()["active_prompt"] == "still works", 30, "a good prompt")
            stats = await (await client.get("/stats")).json()
            assert stats["refused"]["malformed"] == 500 and stats["refused"]["messages"] >= 500
            assert len(stats["sessions"]) == 1 and stats["pending"] == 0
            other, status, _ = await connect(client)  # and a new session still starts
            assert status == 200
            await other.wait(lambda: len(other.frames) >= 2, 30, "a second session's frames")
            await other.close()
        finally:
            await healthy.close()
            await client.close()

    run(go())


def test_offer_that_never_connects_is_cleaned_up():
    from streamedit.serve.bench import Client

    async def go():
        server, client = await start(connect_timeout=1.0, max_sessions=1)
        ghost = Client()
        try:
            await ghost.pc.setLocalDescription(await ghost.pc.createOffer())
            resp = await client.post("/offer", json={"sdp": ghost.pc.localDescription.sdp, "type": "offer"})
            assert resp.status == 200 and len(server.sessions) == 1  # the answer is never applied
            deadline = time.monotonic() + 10
            while server.sessions and time.monotonic() < deadline:
                await asyncio.sleep(0.1)
            assert server.sessions == {}, "a session that never connected kept its slot"
        finally:
            await ghost.close()
            await client.close()

    run(go())


def test_lllite_sessions_get_their_own_unet(tiny_models):
    from streamedit.serve.runtime import LiveEngine

    frame = np.full((64, 64, 3), 120, np.uint8)
    a = LiveEngine(tiny_models, "oil painting", 64, lllite="random")
    b = LiveEngine(tiny_models, "watercolor", 64, lllite="random")
    try:
        assert a.engine.models.unet is not b.engine.models.unet is not tiny_models.unet
        assert a.process([frame])[0].shape == (64, 64, 3) and a.last_prompt == "oil painting"
        a.close()
        assert b.process([frame])[0].shape == (64, 64, 3)  # closing one session leaves the other intact
        assert not any("_lllite_restore" in vars(m) for m in tiny_models.unet.modules())
    finally:
        b.close()


def test_output_frames_convert_to_yuv420p_as_ffmpeg_does():
    """The served frame's RGB -> yuv420p (OpenCV, for speed) agrees with FFmpeg's default conversion, which
    it replaced: same BT.601 limited-range levels; chroma differs only by the subsampling filter."""
    import av

    from streamedit.serve.session import to_yuv420p

    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:96, 0:128].astype(np.float32)
    smooth = cv2.GaussianBlur(rng.uniform(0, 255, (96, 128, 3)).astype(np.float32), (0, 0), 3)
    rgb = np.clip(smooth * 0.5 + np.stack([xx * 2, yy * 2.5, 255 - xx * 2], -1) * 0.5, 0, 255).astype(np.uint8)
    ours = to_yuv420p(rgb)
    ffmpeg = av.VideoFrame.from_ndarray(rgb, format="rgb24").reformat(format="yuv420p")
    assert (ours.format.name, ours.width, ours.height) == ("yuv420p", 128, 96)
    a, b = ours.to_ndarray().astype(int), ffmpeg.to_ndarray().astype(int)
    assert np.abs(a[:96] - b[:96]).max() <= 1  # luma
    assert np.abs(a[96:] - b[96:]).mean() < 1.0  # chroma planes
    back = ours.to_ndarray(format="rgb24").astype(int)
    assert np.abs(back - rgb).mean() <= np.abs(ffmpeg.to_ndarray(format="rgb24").astype(int) - rgb).mean() + 0.5
    odd = to_yuv420p(rgb[:95, :127])  # odd sides: FFmpeg's own conversion
    assert (odd.format.name, odd.width, odd.height) == ("yuv420p", 127, 95)


class _FakeStun(asyncio.DatagramProtocol):
    """A STUN server that answers every Binding request with one made-up public address."""

    MAPPED = ("203.0.113.7", 40000)

    def __init__(self):
        self.requests = 0

    def connection_made(self, transport):
        self.transport = transport

    def datagram_received(self, data, addr):
        from aioice import stun

        request = stun.parse_message(data)
        self.requests += 1
        response = stun.Message(message_method=stun.Method.BINDING, message_class=stun.Class.RESPONSE,
                                transaction_id=request.transaction_id)
        response.attributes["XOR-MAPPED-ADDRESS"] = self.MAPPED
        self.transport.sendto(bytes(response), addr)


def test_ice_servers_reach_the_page_and_the_server_gathers_with_them():
    """--ice-server: the page reads the list from /ice-servers (token-guarded like the rest of the API), and the
    server's own ICE agent uses it: with a STUN server, its answer carries a server-reflexive candidate at the
    address that server reported (what lets a browser reach a server behind NAT). Without one, only host ones."""

    async def go():
        loop = asyncio.get_running_loop()
        transport, stun_server = await loop.create_datagram_endpoint(_FakeStun, local_addr=("127.0.0.1", 0))
        port = transport.get_extra_info("sockname")[1]
        turn = {"urls": "turn:127.0.0.1:3478?transport=udp", "username": "u", "credential": "c"}
        _, guarded = await start(token=TOKEN, ice_servers=[{"urls": f"stun:127.0.0.1:{port}"}, turn])
        server, client = await start(ice_servers=[{"urls": f"stun:127.0.0.1:{port}"}])
        _, plain = await start()
        cams = []
        try:
            assert (await guarded.get("/ice-servers")).status == 401
            listed = await (await guarded.get("/ice-servers", headers={"X-Streamedit-Token": TOKEN})).json()
            assert listed == {"iceServers": [{"urls": f"stun:127.0.0.1:{port}"}, turn]}
            assert await (await plain.get("/ice-servers")).json() == {"iceServers": []}
            for http, srflx in ((client, True), (plain, False)):
                cam, status, body = await connect(http, size=64)
                cams.append(cam)
                assert status == 200, body
                found = re.findall(r"a=candidate:\S+ \d+ udp \d+ (\S+) (\d+) typ srflx", body["sdp"])
                want = {(_FakeStun.MAPPED[0], str(_FakeStun.MAPPED[1]))} if srflx else set()
                assert set(found) == want, body["sdp"]
            assert stun_server.requests >= 1
        finally:
            await close_clients(cams, client)
            await guarded.close()
            await plain.close()
            transport.close()

    run(go())


@pytest.mark.parametrize("args, message", [
    (["--ice-server", "http://stun.example.com"], "is not a STUN/TURN URL"),
    (["--ice-server", "turn:turn.example.com:3478"], "give --turn-user and --turn-password"),
])
def test_bad_ice_server_is_one_line_and_exit_2(args, message):
    proc = subprocess.run([sys.executable, "-m", "streamedit.cli", "serve", "--model", "random:tiny", "--device",
                           "cpu", *args], capture_output=True, text=True, timeout=120)
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == 2 and "--ice-server" in lines[-1] and message in lines[-1], proc.stderr
    assert "Traceback" not in proc.stderr and "loading" not in proc.stderr
