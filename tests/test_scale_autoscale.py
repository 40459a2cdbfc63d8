"""`serve --ray --replicas 1-2`: Ray Serve autoscaling on sessions, one slot per CPU replica (demo model), real
WebRTC clients. A second session scales the app up to 2 replicas; when the first session ends, Serve scales
back down to 1. Ray 2.60 stops the newest replica, the one holding the second session, whatever its load: it
drains, and that session keeps streaming until it ends (then the replica goes at once) or until the drain
timeout (then it is cut, and the ingress says 'replica lost')."""

from __future__ import annotations

import asyncio
import json
import time

import pytest

from test_scale_serve import InvertedCamera, running_app

ray = pytest.importorskip("ray")
import aiohttp  # noqa: E402

from streamedit.serve.bench import Client, connect  # noqa: E402

# Short delays so a scale decision takes seconds (the CLI keeps Ray's slower defaults, serve_cli._replicas).
# metrics_interval_s (deprecated in Ray 2.60, still how often a handle pushes its request counts) defaults to 10 s.
AUTOSCALING = {"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 1.0, "upscale_delay_s": 2.0,
               "downscale_delay_s": 3.0, "look_back_period_s": 2.0, "metrics_interval_s": 0.5}
DRAIN_S = 15.0  # graceful_shutdown_timeout_s: the first test ends its draining session well before this


@pytest.fixture(scope="module")
def app_url():
    # a long queue_timeout: the second offer waits at the ingress while Serve starts a replica for it
    with running_app(autoscaling=AUTOSCALING, drain_s=DRAIN_S, queue_timeout=45.0) as url:
        yield url


def test_build_app_takes_autoscaling_as_json(monkeypatch):
    """`serve run ...:build_app autoscaling='{...}'`: the config reaches deployments() as a dict."""
    from streamedit.scale import serve_app

    got = {}
    monkeypatch.setattr(serve_app, "deployments", lambda **kw: got.update(kw))
    serve_app.build_app({"slots": "1", "drain_s": "15", "autoscaling": json.dumps(AUTOSCALING)})
    assert got == {"slots": 1, "drain_s": 15.0, "autoscaling": AUTOSCALING}



def test_ingress_gives_the_page_the_replicas_ice_servers(monkeypatch):
    """`serve --ray --ice-server ...`: the ingress answers /ice-servers (token-guarded) with the STUN/TURN list
    the replicas' servers get in their config, so the page and the replicas use the same servers."""
    from starlette.requests import Request

    from streamedit.scale import serve_app

    bound = {}

    class FakeDeployment:
        def __init__(self, cls):
            self.cls = cls

        def options(self, **kw):
            return self

        def bind(self, *args, **kw):
            bound[self.cls.__name__] = kw
            return self.cls.__name__

    monkeypatch.setattr(serve_app.serve, "deployment", FakeDeployment)
    monkeypatch.setattr(serve_app, "_board", lambda: None)
    servers = [{"urls": "stun:stun.example.com:3478"}]
    serve_app.deployments(slots=1, gpus=0, model="demo", server={"size": 64, "ice_servers": servers}, token="t" * 8)
    assert bound["StreamReplica"]["server"]["ice_servers"] == servers
    assert bound["Ingress"]["ice_servers"] == servers
    ingress = serve_app.Ingress(None, **bound["Ingress"])

    def get(path, headers=()):
        scope = {"type": "http", "method": "GET", "path": path, "query_string": b"", "headers": list(headers)}
        response = asyncio.run(ingress(Request(scope)))
        return response.status_code, json.loads(response.body)

    assert get("/ice-servers")[0] == 401
    assert get("/ice-servers", [(b"x-streamedit-token", b"t" * 8)]) == (200, {"iceServers": servers})


@pytest.mark.parametrize("args, drain", [((), 60.0), (("--drain", "5"), 5.0)])
def test_serve_cli_passes_the_drain(monkeypatch, args, drain):
    """`serve --ray --drain SECONDS` reaches the app as its graceful shutdown time (default 60 s)."""
    from click.testing import CliRunner

    from streamedit.cli.group import cli
    from streamedit.scale import serve_cli

    got = {}
    monkeypatch.setattr(serve_cli, "run", lambda address, **kw: got.update(kw, address=address))
    result = CliRunner().invoke(cli, ["serve", "--ray", "local", "--device", "cpu", "--model", "random:tiny", *args])
    assert result.exit_code == 0, result.output
    assert got["address"] == "local" and got["drain_s"] == drain
    bad = CliRunner().invoke(cli, ["serve", "--ray", "local", "--drain", "-1"])
    assert bad.exit_code == 2 and "--drain" in bad.output

def _states() -> dict[str, str]:
    """Every StreamReplica Serve holds (starting, running, stopping) -> its state, from the controller."""
    from ray.serve.context import _get_global_client

    details = ray.get(_get_global_client()._controller.get_serve_instance_details.remote())
    replicas = details["applications"]["streamedit"]["deployments"]["StreamReplica"]["replicas"]
    return {r["replica_id"]: getattr(r["state"], "value", r["state"]) for r in replicas}


async def states() -> dict[str, str]:
    return await asyncio.to_thread(_states)


async def until(check, timeout: float, what: str):
    """Poll the async ``check`` until it returns something truthy (returned), or fail after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if got := await check():
            return got
        await asyncio.sleep(0.2)
    raise TimeoutError(f"timed out after {timeout}s waiting for {what}")


async def connect_when_free(http, timeout: float, **params) -> tuple[Client, dict, int]:
    """Offer until accepted (a 503 'busy' is retried with a fresh client): (client, answer, offers made)."""
    deadline, tries = time.monotonic() + timeout, 0
    while True:
        tries += 1
        client, status, body = await connect(http, **params)
        if status == 200:
            return client, body, tries
        await client.close()
        assert status == 503 and time.monotonic() < deadline, (status, body)
        await asyncio.sleep(0.5)


def max_gap(client: Client, start: float, end: float) -> float:
    times = [start] + [t for t, _ in client.arrivals if start <= t <= end] + [end]
    return max(y - x for x, y in zip(times, times[1:]))


async def session_state(http, sid: str) -> dict:
    return await (await http.get(f"/session/{sid}")).json()


async def stop(http, client: Client) -> None:
    """End a session as the page's Stop does: DELETE it (the ingress cancels its call), then close the client."""
    assert (await (await http.delete(f"/session/{client.session}")).json())["stopped"]
    await client.close()


async def scale_up_then_down(http):
    """A on the one replica r1, B scales up to r2, A ends and Serve stops one replica. Returns
    (A, B, r1, r2, the replica states once one is stopping, when A ended, seconds to scale up and down)."""
    first = await until(states, 30, "one running replica")
    assert list(first.values()) == ["RUNNING"], first
    r1 = next(iter(first))
    a, status, body_a = await connect(http, size=64, prompt="oil painting")
    assert status == 200 and body_a["replica"] == r1, body_a
    await a.wait(lambda: len(a.frames) >= 3, 60, "A's first frames")

    # no free slot for B: its offer waits at the ingress's handle, and Serve starts a second replica for it
    t = time.monotonic()
    b, body_b, tries = await connect_when_free(http, 80, size=64, prompt="oil painting",
                                               camera=InvertedCamera(320, 240, 15))
    t_up = time.monotonic() - t
    r2 = body_b["replica"]
    assert r2 != r1 and await states() == {r1: "RUNNING", r2: "RUNNING"}
    await b.wait(lambda: len(b.frames) >= 3, 60, "B's first frames")
    n_a = len(a.arrivals)
    await a.wait(lambda: len(a.arrivals) >= n_a + 3, 30, "A's frames beside B's")
    out_a, out_b = a.frames[-1][2], b.frames[-1][2]  # each session stylizes its own camera
    assert out_a[..., 2].mean() + 30 < out_b[..., 2].mean(), (out_a.mean((0, 1)), out_b.mean((0, 1)))

    async def changed():
        got = await states()
        return got if got != {r1: "RUNNING", r2: "RUNNING"} else None

    await stop(http, a)  # the load drops to one session
    t_load_drop = time.monotonic()
    down = await until(changed, 40, "Serve to stop a replica")
    return a, b, r1, r2, down, t_load_drop, t_up, tries, time.monotonic() - t_load_drop


def test_scale_up_then_down_drains_the_open_session(app_url):
    async def go():
        async with aiohttp.ClientSession(base_url=app_url) as http:
            a, b, r1, r2, down, t_load_drop, t_up, tries, t_down = await scale_up_then_down(http)
            # one replica serving again; the stopped one is r2, with B's session on it: it drains
            assert down == {r1: "RUNNING", r2: "STOPPING"}, down
            t_stop = time.monotonic()
            n_b = len(b.arrivals)
            await b.wait(lambda: len(b.arrivals) >= n_b + 30 and time.monotonic() - t_stop > 5, DRAIN_S - 8,
                         "B's frames while its replica drains")
            assert await states() == {r1: "RUNNING", r2: "STOPPING"}  # the drain holds the replica for B
            assert (await session_state(http, b.session))["state"] == "running"
            gap = max_gap(b, t_load_drop, time.monotonic())
            assert gap < 3.0, f"B's frames stopped for {gap:.1f}s during the scale-down"
            drained_for = time.monotonic() - t_stop

            await stop(http, b)  # B ends: the drain is over, r2 goes at once (not at DRAIN_S)
            t = time.monotonic()
            await until(lambda: _only(r1), 10, "the drained replica to go")
            t_gone = time.monotonic() - t
            assert (await session_state(http, b.session))["reason"] == "stopped"
            print(f"\nscale up (B's offer -> answer, {tries} offer(s)): {t_up:.1f}s; scale down (A ended -> r2 "
                  f"stopping): {t_down:.1f}s; B streamed on draining r2 for {drained_for:.1f}s (largest frame gap "
                  f"{gap:.2f}s); B ended -> r2 gone: {t_gone:.1f}s")

    asyncio.run(asyncio.wait_for(go(), 90))


def test_drain_timeout_cuts_a_session_left_open(app_url):
    async def go():
        async with aiohttp.ClientSession(base_url=app_url) as http:
            a, b, r1, r2, down, t_load_drop, *_ = await scale_up_then_down(http)
            assert down == {r1: "RUNNING", r2: "STOPPING"}, down
            t_stop = time.monotonic()
            # B stays open: Serve kills r2 when graceful_shutdown_timeout_s has passed, and B is cut there
            await until(lambda: _only(r1), DRAIN_S + 15, "r2 to be killed at the drain timeout")
            t_killed = time.monotonic() - t_stop
            info = await until(lambda: _ended(http, b.session), 10, "the ingress to see B's end")
            assert info["reason"].startswith("replica lost"), info
            last = b.arrivals[-1][0] - t_stop
            await b.close()
            assert DRAIN_S - 3 < t_killed and last > DRAIN_S - 3, (t_killed, last)
            print(f"\nr2 stopping -> killed: {t_killed:.1f}s (drain {DRAIN_S:.0f}s); B's last frame "
                  f"{last:.1f}s after the stop; B ended: {info['reason']}")

    asyncio.run(asyncio.wait_for(go(), 100))


async def _only(r1: str) -> bool:
    return await states() == {r1: "RUNNING"}


async def _ended(http, sid: str) -> dict | None:
    info = await session_state(http, sid)
    return info if info["state"] == "ended" else None
