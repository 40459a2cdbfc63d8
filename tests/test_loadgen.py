"""The load generator (`python -m streamedit.serve.bench`): three WebRTC sessions with distinct patterns and
prompts against a server (per-session engines and the shared multi-stream engine), each getting back frames made
from its own camera (checked against the model run directly on each pattern), a mid-run prompt switch within 2
frames, the numbers' consistency, the command end to end (it starts its own `serve`), and its one-line errors.

The content check uses the bundled demo model: `random:tiny` makes the same near-black frame whatever the input
(see tests/test_multistream.py), so no pixel check could fail with it."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys

import numpy as np
import pytest
import torch

pytest.importorskip("aiortc")
from aiohttp import web

from streamedit import EngineConfig, StreamEngine, load_models
from streamedit.models import demo_available
from streamedit.serve import bench
from streamedit.serve.load import PROMPT_TARGET, prompts_for, run_load
from streamedit.serve.runtime import engine_factory
from streamedit.serve.server import Server, ServerConfig, parse_offer

SIZE, FPS = 64, 10


@pytest.fixture(scope="module")
def demo_models():
    if not demo_available():
        pytest.skip("the bundled demo model is not installed")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as `serve` on 2 cores: the other one encodes/decodes video
    yield load_models("demo", device="cpu", dtype=torch.float32)
    torch.set_num_threads(threads)


async def on_port(server: Server) -> tuple[web.AppRunner, str]:
    runner = web.AppRunner(server.app())
    await runner.setup()
    port = bench.free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    return runner, f"http://127.0.0.1:{port}/"


def direct(models, prompt: str, image: np.ndarray) -> np.ndarray:
    """What the model makes of one frame on its own (the live engines: batch 1, seed 0, fixed noise)."""
    cfg = EngineConfig(prompt=prompt, batch_size=1, steps=1, size=SIZE, seed=0, fixed_noise=True, pipeline=False,
                       prefetch=0)
    with StreamEngine(models, cfg) as engine:
        return engine.process([image])[0]


@pytest.mark.parametrize("shared", [False, True], ids=["per-session", "shared-engine"])
def test_three_sessions_get_their_own_frames_and_switch_prompt(demo_models, shared):
    factory = engine_factory(demo_models, shared=shared, max_streams=3)
    clients: list = []

    async def go():
        server = Server(ServerConfig(ice_hosts=["127.0.0.1"], size=SIZE, max_sessions=3), factory)
        runner, url = await on_port(server)
        try:
            report = await run_load(url, 3, FPS, 4.0, size=SIZE, width=SIZE, height=SIZE, warmup=1.0,
                                    keep_pixels=True, clients=clients, first_frame_timeout=120)
            stats = [c.stats() for c in clients]
            return report, stats
        finally:
            await runner.cleanup()

    try:
        report, stats = asyncio.run(asyncio.wait_for(go(), 240))
    finally:
        factory.close()
    rows = report["sessions"]
    assert [r["pattern"] for r in rows] == [0, 1, 2] and len({r["session"] for r in rows}) == 3
    for k, (r, s) in enumerate(zip(rows, stats)):
        assert r["sent"] >= 0.8 * FPS * report["window_s"] and r["received"] > 0 and r["served_fps"] > 0, r
        assert r["drops"] == r["sent"] - r["received"] and r["untraced_frames"] <= 2, r
        assert 0 < r["e2e_ms_p50"] <= r["e2e_ms_p95"] <= r["e2e_ms_p99"] <= r["e2e_ms_max"] < 10_000, r
        # the switch is seen in the server's per-frame trace, and within the target
        assert r["prompt_ok"] and r["prompt_stale_frames"] <= PROMPT_TARGET, r
        assert r["prompt_switch_ms"] > 0 and s["active_prompt"] == prompts_for(k)[1] == r["new_prompt"], (r, s)
    assert report["summary"]["prompt_ok"] and report["summary"]["sessions"] == 3
    # no cross-talk: each received frame is what the model makes of its own camera's frame, not another's
    checked = 0
    for k, client in enumerate(clients):
        recent = [(pts, rgb) for _, pts, rgb in client.frames[-12:] if client.traced(pts)][-3:]
        assert recent, f"session {k}: no traced frame kept"
        for pts, rgb in recent:
            in_pts, prompt = client.traced(pts)
            n = round(in_pts * FPS / 90000)  # the camera's frame index (pts = n * 90000 / fps)
            want = [direct(demo_models, prompt, cam.camera.image(n)) for cam in clients]
            dist = [float(np.abs(rgb.astype(int) - w.astype(int)).mean()) for w in want]
            others = min(d for j, d in enumerate(dist) if j != k)
            # own: codec noise only (~3-4 levels measured); another pattern's output: ~50 levels away
            assert dist[k] < 15 and dist[k] < 0.5 * others, f"session {k} frame {n}: distances to each pattern's output {dist}"
            checked += 1
    assert checked >= 3


def test_command_starts_its_own_server_and_writes_the_report(tmp_path):
    out = tmp_path / "load.json"
    cmd = [sys.executable, "-m", "streamedit.serve.bench", "--model", "random:tiny", "--sessions", "2", "--fps",
           "10", "--seconds", "3", "--warmup", "0.5", "--size", "64", "--input", "96x64", "--shared-engine",
           "--prompt-api", "http", "--cpu-threads", "1", "--server-log", str(tmp_path / "server.log"),
           "--json", str(out)]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=240, check=False)
    assert res.returncode == 0, res.stderr[-2000:]
    report = json.loads(out.read_text())
    assert report["server_started"] and report["model"] == "random:tiny" and report["input"] == "96x64"
    assert len(report["sessions"]) == 2 and report["summary"]["sent"] == sum(r["sent"] for r in report["sessions"])
    for r in report["sessions"]:
        assert r["served_fps"] > 0 and r["e2e_ms_p50"] > 0 and r["prompt_ok"], r
    lines = res.stdout.splitlines()
    assert lines[0].split()[:4] == ["session", "prompt", "sent", "fps"] and len(lines) >= 4
    assert "prompt switch ok" in lines[3] and "server process (window start -> end): threads" in lines[4]
    assert "--shared-engine" in (tmp_path / "server.log").read_text() or "--shared-engine" in res.stderr
    # the server it started is gone
    assert "streamedit serve" in res.stderr and subprocess.run(["pgrep", "-f", str(tmp_path / "server.log")],
                                                               capture_output=True, check=False).returncode == 1


@pytest.mark.parametrize("args, message", [
    ([], "give exactly one of --url"),
    (["--url", "http://127.0.0.1:1/", "--model", "random:tiny"], "give exactly one of --url"),
    (["--url", "http://127.0.0.1:1/", "--sessions", "0"], "--sessions must be positive"),
    (["--url", "http://127.0.0.1:1/", "--input", "big"], "--input must be WIDTHxHEIGHT"),
    (["--url", "http://127.0.0.1:1/", "--size", "100"], "--size must be a multiple of 32"),
    (["--url", "ftp://x/"], "--url must be http(s)://host:port/"),
    (["--url", "http://127.0.0.1:1/"], "cannot reach the server at http://127.0.0.1:1"),
    (["--model", "random:nope", "--server-timeout", "60"], "the server exited"),
])
def test_mistakes_are_one_line_errors(args, message, capsys):
    with pytest.raises(SystemExit) as exc:
        bench.main(args)
    err = capsys.readouterr().err.splitlines()
    assert exc.value.code == 2 and message in err[-1], err
    assert not any("Traceback" in line for line in err)


def test_offer_trace_flag_is_checked():
    sdp = "v=0\r\nm=video 9 UDP/TLS/RTP/SAVPF 96\r\na=sendrecv\r\na=rtpmap:96 VP8/90000\r\n"
    cfg = ServerConfig()
    assert parse_offer(json.dumps({"sdp": sdp, "type": "offer"}).encode(), cfg)["trace"] is False
    assert parse_offer(json.dumps({"sdp": sdp, "type": "offer", "trace": True}).encode(), cfg)["trace"] is True
    with pytest.raises(ValueError, match="'trace' must be true or false"):
        parse_offer(json.dumps({"sdp": sdp, "type": "offer", "trace": "yes"}).encode(), cfg)


class _Echo:
    """An engine that hands frames back unchanged: only the media path matters here."""

    def __init__(self, prompt, size):
        pass

    def set_prompt(self, prompt):
        pass

    def process(self, frames):
        return list(frames)


def test_load_generator_takes_the_servers_ice_servers():
    """The load generator's sessions gather with the server's `GET /ice-servers` list, as the page does: with a
    STUN server there, each client's offer carries the reflexive candidate that server reported."""
    from test_serve import _FakeStun

    clients: list = []

    async def go():
        loop = asyncio.get_running_loop()
        transport, stun = await loop.create_datagram_endpoint(_FakeStun, local_addr=("127.0.0.1", 0))
        stun_url = f"stun:127.0.0.1:{transport.get_extra_info('sockname')[1]}"
        server = Server(ServerConfig(ice_hosts=["127.0.0.1"], size=SIZE, max_sessions=2,
                                     ice_servers=[{"urls": stun_url}]), _Echo)
        runner, url = await on_port(server)
        try:
            report = await run_load(url, 2, FPS, 1.0, size=SIZE, width=SIZE, height=SIZE, warmup=0.2,
                                    clients=clients, prompt_change=False, first_frame_timeout=60)
        finally:
            await runner.cleanup()
            transport.close()
        return report, stun.requests

    report, requests = asyncio.run(asyncio.wait_for(go(), 120))
    assert len(report["sessions"]) == 2 and requests >= 2
    mapped = f"{_FakeStun.MAPPED[0]} {_FakeStun.MAPPED[1]} typ srflx"
    assert all(mapped in c.pc.localDescription.sdp for c in clients), [c.pc.localDescription.sdp for c in clients]
