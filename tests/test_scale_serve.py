"""`serve --ray`: the Ray Serve app on a local cluster, 2 CPU replicas (num_gpus=0) of one slot each running the
demo model, real WebRTC sessions (serve/bench.py's client)."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from pathlib import Path

import pytest

ray = pytest.importorskip("ray")
pytest.importorskip("aiortc")
import aiohttp  # noqa: E402

from streamedit.serve.bench import SyntheticCamera, connect  # noqa: E402
from streamedit.serve.server import restrict_ice_hosts  # noqa: E402


@contextlib.contextmanager
def running_app(**deploy_kw):
    """A local Ray cluster with the Serve app (slot per replica, CPU, demo model) on a free port; yields its URL."""
    from ray import serve

    from streamedit.scale.serve_app import deployments

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    restrict_ice_hosts(["127.0.0.1"])  # the client here: loopback candidates only, as the replicas have
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(deployments(slots=1, gpus=0, model="demo", device="cpu", threads=1,
                              server={"ice_hosts": ["127.0.0.1"], "size": 64}, **deploy_kw),
                  name="streamedit", route_prefix="/")
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()


@pytest.fixture(scope="module")
def app_url():
    with running_app(replicas=2, queue_timeout=2.0) as url:
        yield url


class InvertedCamera(SyntheticCamera):
    """The same moving pattern with its colours inverted (a different blue level from the plain camera)."""

    def image(self, n: int):
        return 255 - super().image(n)


def _replica_actor(replica_id: str):
    names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
             if "StreamReplica" in a["name"] and replica_id in a["name"]]
    assert len(names) == 1, names
    return ray.get_actor(names[0], namespace="serve")


def test_sessions_spread_over_replicas_and_survive_a_lost_one(app_url):
    async def go():
        async with aiohttp.ClientSession(base_url=app_url) as http:
            assert (await (await http.get("/health")).json())["status"] == "ok"
            a, status, body_a = await connect(http, size=64, prompt="oil painting")
            assert status == 200, body_a
            b, status, body_b = await connect(http, size=64, prompt="oil painting",
                                              camera=InvertedCamera(320, 240, 15))
            assert status == 200, body_b
            assert body_a["replica"] != body_b["replica"]  # one slot each: the second offer found the free one
            c, status, body = await connect(http, size=64)
            await c.close()
            assert status == 503 and "busy" in body["error"]  # the cluster is full: a clean refusal
            for cam in (a, b):
                await cam.wait(lambda cam=cam: len(cam.frames) >= 3, 120, "3 stylized frames")
            out_a, out_b = a.frames[-1][2], b.frames[-1][2]
            assert out_a.shape == out_b.shape and out_a.shape[2] == 3
            # each session gets the stylized frames of its own camera (the demo model keeps the colours)
            assert out_a[..., 2].mean() + 30 < out_b[..., 2].mean(), (out_a.mean((0, 1)), out_b.mean((0, 1)))
            await a.wait(lambda: any(m.get("type") == "stats" for m in a.messages), 30, "stats on the data channel")
            await asyncio.sleep(1.5)  # every replica has posted its sessions since they started
            stats = await (await http.get("/stats")).json()
            assert sorted(s["id"] for s in stats["sessions"]) == sorted([a.session, b.session]), stats
            assert stats["max_sessions"] == 2 and len(stats["replicas"]) == 2

            ray.kill(_replica_actor(body_a["replica"]), no_restart=True)
            got = len(b.frames)
            await b.wait(lambda: len(b.frames) >= got + 5, 60, "B's frames after A's replica died")

            async def state(sid):
                return await (await http.get(f"/session/{sid}")).json()

            for _ in range(100):
                if (await state(a.session))["state"] == "ended":
                    break
                await asyncio.sleep(0.2)
            info = await state(a.session)
            assert info["state"] == "ended" and info["reason"].startswith("replica lost"), info
            assert (await state(b.session))["state"] == "running"
            # stopped by the API first: a client closing first can end the session before the DELETE arrives
            assert (await (await http.delete(f"/session/{b.session}")).json())["stopped"]
            await b.close()
            d, status, body_d = await connect(http, size=64, prompt="watercolor")
            try:
                assert status == 200, body_d
                assert body_d["replica"] != body_a["replica"]
                await d.wait(lambda: len(d.frames) >= 3, 120, "frames of a session after the loss")
            finally:
                await d.close()
                await a.close()

    asyncio.run(go())


def _tagged(tag: str) -> list[int]:
    """Processes whose environment carries ``tag`` (a command's children and Ray's node processes inherit it)."""
    found = []
    for env in Path("/proc").glob("[0-9]*/environ"):
        with contextlib.suppress(OSError):
            if tag.encode() in env.read_bytes():
                found.append(int(env.parent.name))
    return found


@pytest.mark.timeout(300)
@pytest.mark.parametrize("when", ["loading", "serving"])
def test_interrupted_serve_ray_local_leaves_no_ray_process(when):
    """`serve --ray local` starts its own cluster; Ctrl-C (while the replica loads, or while serving) ends the
    command with 130 and the cluster with it. Before, main()'s os._exit skipped Ray's atexit hook and the node's
    agents lived on for up to a minute (or, stopped while loading, the app was not deleted at all)."""
    import os
    import signal
    import subprocess
    import sys
    import threading
    import time
    import uuid

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    tag = uuid.uuid4().hex
    env = dict(os.environ, STREAMEDIT_TEST_TAG=tag)
    cmd = [sys.executable, "-m", "streamedit.cli", "serve", "--ray", "local", "--model", "demo", "--device", "cpu",
           "--replicas", "1", "--size", "64", "--host", "127.0.0.1", "--port", str(port), "--token", "t"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    want = "open http" if when == "serving" else "Started Serve"
    lines = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stderr), daemon=True)  # until the pipe closes
    reader.start()
    deadline = time.time() + 200
    while time.time() < deadline and not any(want in ln for ln in lines) and proc.poll() is None:
        time.sleep(0.1)
    assert any(want in ln for ln in lines), "".join(lines)
    proc.send_signal(signal.SIGINT)
    proc.wait(timeout=120)
    reader.join(timeout=30)
    err = "".join(lines)
    assert proc.returncode == 130 and "Traceback" not in err, err
    deadline = time.time() + 10
    while _tagged(tag) and time.time() < deadline:
        time.sleep(0.5)
    left = _tagged(tag)
    for pid in left:  # do not leave them to the next test
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)
    assert not left, f"{len(left)} processes of the command's cluster still running 10 s after it exited"
