"""The live commands on the shared multi-stream engine: which engine `serve`/`live` pick (CUDA -> shared +
exact, CPU -> shared + eager, --no-shared-engine -> per session), the measured --max-sessions formula
against a simulation of the engine's fair scheduler, the engine's report (per-stream fps, latency, drops,
batch histogram, busy share), per-stream failure isolation in the engine, and over real HTTP/WebRTC:
refusal beyond --max-sessions, /stats of two sessions, a broken client that ends only its own session."""

from __future__ import annotations

import asyncio
import sys
import threading
import time

import numpy as np
import pytest
from conftest import close_clients, run_closing

from streamedit.engine.multistats import BusyClock, capacity, rows_per_tick, stream_fps
from streamedit.errors import StreameditError
from streamedit.serve.runtime import engine_factory
from streamedit.serve.shared import LIVE_SWITCH_INTERVAL_S, choose_engine

PROMPTS = ("oil painting", "watercolor", "pencil sketch")


def pattern(k: int, t: int, h: int = 64, w: int = 64) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w]
    return np.stack([(xx * 4 + 9 * t + 40 * k) % 256, (yy * 4 + 3 * t) % 256,
                     np.full_like(xx, 60 * k)], -1).astype(np.uint8)


# ---- engine choice and capacity (no model) -------------------------------------------------------
def test_default_engine_choice():
    gpu, cpu = choose_engine(True), choose_engine(False)
    assert (gpu.shared, gpu.preset) == (True, "exact") and "CUDA" in gpu.why
    assert (cpu.shared, cpu.preset) == (True, "eager")
    assert choose_engine(True, preset="eager").preset == "eager"  # explicit: nothing compiled on the GPU
    assert choose_engine(True, shared=True, preset="paper").preset == "paper"
    per_session = choose_engine(True, shared=False)
    assert (per_session.shared, per_session.preset) == (False, "eager")
    with pytest.raises(StreameditError, match="--no-shared-engine"):
        choose_engine(True, shared=False, preset="exact")
    with pytest.raises(StreameditError, match="max"):
        choose_engine(True, preset="max")  # one TE pass per batch: not per stream


def scheduled_fps(engine, batch_s: dict[int, float], streams: int, ticks: int = 600) -> float:
    """The slowest stream's rate under the engine's own scheduler (``_select``, nothing run) when every
    stream always has a new frame and a batch of each bucket takes ``batch_s``."""
    handles = [engine.open_stream() for _ in range(streams)]
    served = dict.fromkeys(range(streams), 0)
    clock, frame = 0.0, np.zeros((64, 64, 3), np.uint8)
    try:
        for _ in range(ticks):
            for s in handles:
                s.submit(frame)
            with engine._cond:
                _, _, items = engine._select()
            for s, _ in items:
                served[handles.index(s)] += 1
            clock += batch_s[next(b for b in engine.buckets if b >= len(items))]
    finally:
        for s in handles:
            s.close()
    return min(served.values()) / clock


def test_capacity_matches_the_engines_scheduler(tiny_models):
    """stream_fps (the --max-sessions formula) is what the fair scheduler gives each of K busy streams, for
    made-up batch times and for the H100's measured ones (where 5 streams are served 4 per tick, not 8)."""
    from streamedit import EngineConfig
    from streamedit.engine.multi import MultiStreamEngine

    made_up = {1: 0.010, 2: 0.012, 4: 0.016, 8: 0.024}
    h100 = {1: 0.0147, 2: 0.0209, 4: 0.0340, 8: 0.0601}  # docs/benchmarks.md, serve start-up 2026-12-06
    config = EngineConfig(prompt="oil painting", batch_size=8, size=64, fixed_noise=True)
    fps = {}
    with MultiStreamEngine(tiny_models, config, max_streams=20) as engine:
        assert engine.buckets == tuple(made_up)
        for name, batch_s in (("made_up", made_up), ("h100", h100)):
            engine.batch_seconds[(64, 64)] = batch_s  # what prepare(measure=) records
            fps[name] = {k: scheduled_fps(engine, batch_s, k) for k in (1, 2, 3, 5, 6, 8, 9, 13, 14, 20)}
            for k, got in fps[name].items():
                assert stream_fps(batch_s, k) == pytest.approx(got, rel=0.01), (name, k)
        engine.batch_seconds.clear()  # unmeasured: as many as ready, up to the largest bucket
        assert scheduled_fps(engine, h100, 5) == pytest.approx(1 / 0.0601, rel=0.01)
    assert capacity(made_up, 24.0) == 13 and fps["made_up"][13] >= 24.0 > fps["made_up"][14]  # 8 / (13 * 24 ms)
    assert fps["made_up"][5] == pytest.approx(4 / (5 * 0.016), rel=0.01)  # 4 a tick beats 5 padded to 8
    assert fps["h100"][5] == pytest.approx(4 / (5 * 0.0340), rel=0.01)  # 23.5 fps, against 16.6 padded to 8
    assert capacity(h100, 24.0) == 4 and capacity(h100, 23.0) == 5
    assert rows_per_tick(h100, 8, (1, 2, 4, 8)) == 8 and rows_per_tick(None, 5, (1, 2, 4, 8)) == 5
    assert rows_per_tick(h100, 3, (1, 2, 4, 8)) == 3  # 88 frames/s together, 96 two at a time: within 10 %
    assert rows_per_tick(h100, 6, (1, 2, 4, 8)) == 4  # 118 four at a time, 100 padded to 8: not
    assert capacity({1: 0.1}, 30.0) == 1  # not even one stream at the target: still one session


# ---- the engine ---------------------------------------------------------------------------------
def test_start_engine_prepares_before_sessions_and_measures_on_request(tiny_models):
    """`serve`'s start-up on CPU: the shared eager engine, its size group built before any session, the
    default limit 2; and the batch-time measurement (what CUDA start-up runs) gives a figure per bucket."""
    from streamedit.serve.runtime import start_engine

    lines, before = [], sys.getswitchinterval()
    factory, limit = start_engine(tiny_models, size=64, max_batch=4, frame_sizes=[(32, 64)], echo=lines.append)
    try:
        engine = factory.shared().engine
        assert limit == 2 and engine.max_streams == 4 and engine._thread is not None
        assert lines[0].startswith("engine: one shared multi-stream engine, preset eager")
        assert "built (eager: nothing to capture) 64x32 for batches of 1, 2, 4" in lines[1]
        assert (32, 64) in engine._groups  # before any session
        assert sys.getswitchinterval() == LIVE_SWITCH_INTERVAL_S < before  # the refresh flows' GIL wait
    finally:
        factory.close()
    assert sys.getswitchinterval() == before  # given back with the engine
    one, two = (engine_factory(tiny_models, shared=True, batch_size=1) for _ in range(2))
    try:
        one.build(64).start()
        two.build(64).start()
        one.close()
        assert sys.getswitchinterval() == LIVE_SWITCH_INTERVAL_S  # while another shared engine still runs
    finally:
        one.close()
        two.close()
    assert sys.getswitchinterval() == before
    factory, limit = start_engine(tiny_models, size=64, max_batch=2, frame_sizes=[(48, 64)], max_sessions=5,
                                  shared=True, echo=lines.append)
    factory.close()
    assert limit == 5
    factory = engine_factory(tiny_models, shared=True, batch_size=2)
    try:
        shared = factory.build(64)
        (done,) = shared.prepare([(32, 64)], 64, measure=2)
        assert done["shape"] == (32, 64) and set(done["batch_s"]) == {1, 2} and min(done["batch_s"].values()) > 0
        assert shared.engine.report()["batch_ms"]["64x32"][2] > 0 and shared.engine.stats.batches == 0
        assert capacity(done["batch_s"], 1.0) >= 1
    finally:
        factory.close()


def shared_engine(tiny_models, streams: int = 3):
    factory = engine_factory(tiny_models, shared=True, max_streams=streams)
    return factory, factory.build(64).engine


def test_report_counts_drops_histogram_and_busy_share(tiny_models):
    factory, engine = shared_engine(tiny_models)
    try:
        a, b = engine.open_stream("oil painting"), engine.open_stream("watercolor")
        for t in range(4):
            a.submit(pattern(0, t))
            a.submit(pattern(0, t + 100))  # replaces the first: latest-frame-wins
            b.submit(pattern(1, t))
            assert engine.tick() == 2
            assert a.get(timeout=0).index == 2 * t + 1 and b.get(timeout=0).index == t
        report = engine.report()
        ra, rb = report["streams"][a.id], report["streams"][b.id]
        assert (ra["submitted"], ra["processed"], ra["dropped"]) == (8, 4, 4)
        assert (rb["processed"], rb["dropped"]) == (4, 0) and rb["prompt"] == "watercolor"
        assert 0 < ra["latency_p50_ms"] <= ra["latency_p95_ms"] and ra["fps"] >= 0  # fps: last 5 s only
        times = list(a.stats.delivered_at)  # served fps = outputs per second of its delivery times
        assert len(times) == 4 and a.stats.fps(window=600) == pytest.approx(3 / (times[-1] - times[0]))
        assert report["histogram"] == {2: 4} and report["batches"] == 4 and report["frames"] == 8
        assert report["busy_clock"] == "host" and 0 < report["busy_share"] <= 1
        busy = report["busy_share"] * report["wall_s"]  # synchronous ticks: the sum of their spans
        assert busy == pytest.approx(sum(r.t_done - r.t_launch for r in engine.tick_log), rel=0.02)
        ticks = report["ticks"]
        assert ticks["count"] == 4 and ticks["rows_mean"] == 2 and ticks["te_calls_mean"] in (1, 2)
        spans = [1e3 * (r.t_done - r.t_launch) for r in engine.tick_log]
        assert ticks["tick_ms"] == [pytest.approx(v, abs=0.01) for v in np.percentile(spans, [50, 95])]
        assert 0 < ticks["launch_ms"][0] <= ticks["tick_ms"][1] and ticks["wait_ms"][0] >= 0
        assert list(ticks["phases_ms"]) == ["rows", "stack", "text", "encode", "unet", "copy"]  # no adapter: no cond
        for r in engine.tick_log:  # the parts add up to the launch
            assert sum(r.phases_ms.values()) == pytest.approx(r.launch_ms, abs=0.5)
    finally:
        factory.close()


def test_busy_clock_counts_overlapping_ticks_once():
    clock = BusyClock(cuda=False)
    for start, end in ((0.0, 1.0), (0.5, 2.0), (1.5, 1.8), (3.0, 4.0)):  # pipelined ticks overlap
        clock.add(start, end)
    assert clock.busy_s == pytest.approx(3.0)


def test_a_stream_whose_input_breaks_the_tick_ends_alone(tiny_models, monkeypatch):
    factory, engine = shared_engine(tiny_models)
    try:
        streams = [engine.open_stream(p) for p in PROMPTS]
        broken = streams[1]
        monkeypatch.setattr(broken, "noise", lambda *a: (_ for _ in ()).throw(ValueError("bad frame data")))
        for k, s in enumerate(streams):
            s.submit(pattern(k, 0))
        assert engine.tick() == 2  # the other two ran
        assert broken.closed and "bad frame data" in broken.error
        with pytest.raises(StreameditError, match="failed: its frame could not be processed"):
            broken.get(timeout=1)
        with pytest.raises(StreameditError, match="failed"):
            broken.submit(pattern(1, 1))
        for t in range(1, 3):  # the others keep producing, in later ticks too
            for k in (0, 2):
                streams[k].submit(pattern(k, t))
            assert engine.tick() == 2
        assert [streams[0].get(timeout=0).index for _ in range(3)] == [0, 1, 2]
        assert engine.error is None and len(engine.streams) == 2
    finally:
        factory.close()


@pytest.mark.parametrize("where", ["launch", "launch-pipelined", "hand-out-pipelined"])
def test_an_engine_failure_ends_every_stream_with_the_reason(tiny_models, monkeypatch, where):
    """A failed launch (tick thread) or hand-out (the pipelined hand-out thread) ends every stream with the
    reason, and the engine still stops and closes (no thread left waiting on the other)."""
    from streamedit.diffusion.denoiser import Denoiser

    factory, engine = shared_engine(tiny_models)
    try:
        streams = [engine.open_stream(p) for p in PROMPTS[:2]]
        engine.pipelined = where.endswith("pipelined")  # as on CUDA: launches and hand-outs on two threads
        engine.start()
        fail = lambda *a, **k: (_ for _ in ()).throw(RuntimeError("device lost"))  # noqa: E731
        if where.startswith("launch"):
            monkeypatch.setattr(Denoiser, "denoise", fail)
        else:
            monkeypatch.setattr(engine, "_finish", fail)
        for k, s in enumerate(streams):
            s.submit(pattern(k, 0))
        for s in streams:  # the readers are woken with the reason, not left waiting
            with pytest.raises(StreameditError, match="shared engine stopped.*device lost"):
                s.get(timeout=30)
        assert "device lost" in factory.error() and "device lost" in engine.report()["error"]
        with pytest.raises(StreameditError, match="engine stopped"):
            engine.open_stream("oil painting")
    finally:
        factory.close()


# ---- serve over HTTP / WebRTC ------------------------------------------------------------------
pytest.importorskip("aiortc")


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 150))


async def start_server(factory, **cfg):
    from aiohttp.test_utils import TestClient, TestServer

    from streamedit.serve.server import Server, ServerConfig

    server = Server(ServerConfig(ice_hosts=["127.0.0.1"], size=64, **cfg), factory)
    client = TestClient(TestServer(server.app(), host="127.0.0.1"))
    await client.start_server()
    return server, client


def test_max_sessions_refused_with_503_and_stats_of_two_sessions(tiny_models):
    from streamedit.serve.bench import connect

    factory = engine_factory(tiny_models, shared=True, max_streams=4)

    async def go():
        _, client = await start_server(factory, max_sessions=2)
        cams = []
        try:
            for prompt in PROMPTS[:2]:
                cam, status, body = await connect(client, size=64, prompt=prompt)
                cams.append(cam)
                assert status == 200, body
            extra, status, body = await connect(client, size=64)
            await extra.close()
            assert status == 503 and body == {"error": "server busy: 2 of 2 sessions in use, try again when one ends"}
            for cam in cams:
                await cam.wait(lambda cam=cam: len(cam.frames) >= 4, 90, "4 stylized frames")
            stats = await (await client.get("/stats")).json()
            engine = stats["engine"]
            assert engine["shared"] is True and engine["preset"] == "eager" and engine["busy_clock"] == "host"
            assert 0 < engine["busy_share"] <= 1 and engine["batches"] > 0
            assert sum(int(k) * v for k, v in engine["histogram"].items()) == engine["frames"]
            assert stats["refused"]["busy"] == 1 and len(stats["sessions"]) == 2
            for session in stats["sessions"]:
                per_stream = engine["streams"][str(session["stream"])]
                assert per_stream["processed"] >= 4 and per_stream["fps"] > 0
                assert 0 < per_stream["latency_p50_ms"] <= per_stream["latency_p95_ms"]
                assert per_stream["dropped"] >= 0 and session["dropped_input"] >= per_stream["dropped"]
                assert session["fps"] > 0 and session["latency_ms_p50"] > 0
            assert sorted(s["active_prompt"] for s in stats["sessions"]) == sorted(PROMPTS[:2])
        finally:
            await close_clients(cams, client)

    run_closing(run, go(), factory)


def test_a_stopped_engine_refuses_new_sessions_cleanly(tiny_models):
    from streamedit.serve.bench import connect

    factory = engine_factory(tiny_models, shared=True, max_streams=2)
    factory.build(64).engine.error = RuntimeError("device lost")  # as a failed tick leaves it

    async def go():
        _, client = await start_server(factory, max_sessions=2)
        try:
            cam, status, body = await connect(client, size=64)
            await cam.close()
            assert status == 503 and "shared engine stopped: RuntimeError: device lost" in body["error"]
            health = await (await client.get("/health")).json()
            assert health["status"] == "error" and "device lost" in health["error"]
        finally:
            await client.close()

    run_closing(run, go(), factory)


class Collector:
    """Stands in for the outgoing aiortc track: keeps what the session hands out."""

    def __init__(self, session):
        self.items = []

    def put(self, item):
        self.items.append(item)

    def stop(self):
        pass


@pytest.mark.parametrize("bad", [np.zeros((64, 64, 3), np.float32), np.zeros((64, 64), np.uint8)],
                         ids=["dtype", "shape"])
def test_a_malformed_frame_ends_only_its_session(tiny_models, bad):
    """Two sessions on one shared engine; one sends a malformed frame: it gets an error and ends, the other
    keeps producing."""
    from streamedit.serve.session import Session

    factory = engine_factory(tiny_models, shared=True, max_streams=2)

    async def go():
        loop = asyncio.get_running_loop()
        errors: dict[str, list] = {"good": [], "bad": []}
        sessions = {name: Session(name, factory, "oil painting", 64, loop, track_factory=Collector,
                                  on_error=errors[name].append) for name in ("good", "bad")}
        for s in sessions.values():
            s.start()
        good, broken = sessions["good"], sessions["bad"]
        try:
            for t in range(3):
                for k, s in enumerate(sessions.values()):
                    s.submit(pattern(k, t))
                await asyncio.sleep(0.3)
            broken.submit(bad)
            deadline = time.monotonic() + 60
            while not errors["bad"] and time.monotonic() < deadline:
                good.submit(pattern(0, 10))
                await asyncio.sleep(0.1)
            assert errors["bad"] and "HxWx3 uint8" in errors["bad"][0] and not errors["good"]
            n = len(good.track.items)
            for t in range(20, 60):  # the healthy session keeps producing
                good.submit(pattern(0, t))
                await asyncio.sleep(0.05)
                if len(good.track.items) >= n + 3:
                    break
            assert len(good.track.items) >= n + 3 and good.error is None
            assert factory.error() is None and len(factory.shared().engine.streams) == 1
        finally:
            for s in sessions.values():
                await s.close()

    run_closing(run, go(), factory)
    assert not [t for t in threading.enumerate() if t.name.startswith(("streamedit-session", "streamedit-output"))
                and t.is_alive()]


def test_live_uses_one_stream_of_the_shared_engine(tiny_models, monkeypatch):
    """`live`'s engine on CPU by default: one stream of a multi-stream engine, prepared for the camera's
    working size before the first frame; its outputs are the per-session engine's."""
    import click

    from streamedit.serve import live
    from streamedit.serve.runtime import LiveEngine

    lines = []
    monkeypatch.setattr(click, "echo", lambda msg, err=False: lines.append(msg))
    ctx = click.Context(live.live_command)
    with ctx:
        engine = live._live_engine(tiny_models, None, None, "watercolor", 64, (32, 64), 1, None, 512)
    reference = LiveEngine(tiny_models, "watercolor", 64)
    try:
        assert engine.stream.engine.buckets == (1,) and engine.shared.preset == "eager"
        assert any("built (eager" in line and "64x32" in line for line in lines), lines
        frames = [pattern(0, t, 32, 64) for t in range(3)]
        got = [engine.process([f])[0] for f in frames]
        want = [reference.process([f])[0] for f in frames]
        for g, w in zip(got, want):
            assert np.abs(g.astype(int) - w.astype(int)).max() <= 1
    finally:
        engine.close()
        engine.shared.close()
        reference.close()
