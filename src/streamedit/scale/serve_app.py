"""``streamedit serve --ray``: the live server as Ray Serve deployments (docs/scale-out.md).

``StreamReplica`` (``num_gpus`` each, 1 by default): one model and the existing server's session handling
(``serve.server.Server`` with its engine factory, ``--shared-engine`` too) for ``slots`` sessions. A session is
one ongoing request: the replica's ``session`` method answers the WebRTC offer, then stays open until the
session ends, so ``max_ongoing_requests=slots`` makes Serve route a new offer to a replica with a free slot,
autoscaling counts sessions, and a replica being scaled down drains: Serve waits (up to
``graceful_shutdown_timeout_s``) for its open sessions. Media and the data channel end in that replica.

``Ingress`` (CPU): the page, token auth, body limits, ``/health``, ``/ice-servers``, ``/stats`` (every replica's,
from the ``Board`` actor each replica reports to), ``POST /offer`` (503 when no replica has a free slot within
``queue_timeout``), ``DELETE /session/{id}``, ``GET /session/{id}`` (running, or why it ended).

``serve run streamedit.scale.serve_app:build_app model=demo replicas=2`` runs it without the CLI
(``autoscaling='{"min_replicas": 1, "max_replicas": 4}'``: Ray's autoscaling_config as JSON).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import time
import uuid

from ray import serve

from ..serve.server import STATIC

BOARD = "streamedit-board"


class Board:
    """Where replicas post their session snapshots (every ``interval``); entries that stop coming are gone."""

    def __init__(self):
        self.entries: dict[str, tuple[float, dict]] = {}

    def post(self, replica: str, snapshot: dict) -> None:
        self.entries[replica] = (time.monotonic(), snapshot)

    def read(self, max_age: float = 3.0) -> list[dict]:
        now = time.monotonic()
        return [snap for t, snap in self.entries.values() if now - t <= max_age]


def _board():
    import ray

    return ray.remote(Board).options(name=BOARD, namespace="streamedit", get_if_exists=True, lifetime="detached",
                                     num_cpus=0).remote()


class _Body:
    """What ``Server.offer`` reads of an aiohttp request."""

    def __init__(self, body: bytes):
        self._body = body

    async def read(self) -> bytes:
        return self._body


class StreamReplica:
    def __init__(self, model: str = "demo", device: str | None = None, dtype: str | None = None,
                 revision: str | None = None, steps: int = 1, lllite: str | None = None, te_size: int = 512,
                 slots: int = 2, shared: bool = False, server: dict | None = None, threads: int | None = None):
        from ..serve.runtime import engine_factory, load_runtime, set_cpu_threads
        from ..serve.server import Server, ServerConfig

        models = load_runtime(model, device, dtype, revision)
        set_cpu_threads(models, threads)
        self.factory = engine_factory(models, steps=steps, lllite=lllite, te_size=te_size, shared=shared,
                                      max_streams=slots)
        self.server = Server(ServerConfig(**{**(server or {}), "max_sessions": slots, "token": None,
                                             "model_name": model}), self.factory)
        try:
            self.id = serve.get_replica_context().replica_id.unique_id
        except Exception:  # noqa: BLE001 - outside a Serve replica (direct construction)
            self.id = uuid.uuid4().hex[:8]
        self.board, self._reporter = _board(), None

    async def _report(self) -> None:
        while True:
            s = self.server
            self.board.post.remote(self.id, {"replica": self.id, "max_sessions": s.config.max_sessions,
                                             "sessions": [x.snapshot() for x in s.sessions.values()],
                                             "refused": s.refused})
            await asyncio.sleep(1.0)

    async def session(self, body: bytes):
        """Answer the offer (first item), then stay open while the session runs: one ongoing request."""
        if self._reporter is None:
            self._reporter = asyncio.ensure_future(self._report())
        resp = await self.server.offer(_Body(body))
        payload = json.loads(resp.body)
        yield {"status": resp.status, "replica": self.id, **payload}
        if resp.status != 200:
            return
        sid = payload["session"]
        try:
            while sid in self.server.sessions:
                await asyncio.sleep(0.25)
        finally:  # ended by the client, the connection, or the ingress cancelling this call
            await self.server.close_session(sid)
        yield {"ended": sid}

    async def check_health(self) -> None:
        if self._reporter is not None and self._reporter.done() and self._reporter.exception():
            raise RuntimeError(f"stats reporter died: {self._reporter.exception()}")


class Ingress:
    def __init__(self, replicas, token: str | None = None, queue_timeout: float = 5.0,
                 max_body_bytes: int = 64 * 1024, ice_servers: list[dict] | None = None):
        self.replicas, self.token, self.queue_timeout, self.max_body = replicas, token, queue_timeout, max_body_bytes
        self.ice_servers = ice_servers or []  # the replicas' --ice-server list, for the page
        self.live: dict[str, tuple[object, str]] = {}   # session -> (its open call, replica)
        self.ended: dict[str, str] = {}                 # session -> why it ended
        self.refused = {"auth": 0, "busy": 0, "malformed": 0}
        self.board = _board()

    async def __call__(self, request):
        from starlette.responses import FileResponse, JSONResponse

        path, method = request.url.path, request.method
        if self.token and not path.startswith(("/health", "/static/")):
            auth = request.headers.get("authorization", "")
            given = auth[7:].strip() if auth.startswith("Bearer ") else (
                request.headers.get("x-streamedit-token") or request.query_params.get("token", ""))
            if not hmac.compare_digest(given.encode(), self.token.encode()):
                self.refused["auth"] += 1
                return JSONResponse({"error": "missing or wrong access token"}, status_code=401)
        if path == "/" and method == "GET":
            return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-store"})
        if path.startswith("/static/") and method == "GET":
            name = path[len("/static/"):]
            target = STATIC / name
            if "/" in name or name.startswith(".") or not target.is_file():
                return JSONResponse({"error": "not found"}, status_code=404)
            return FileResponse(target)
        if path == "/health":
            return JSONResponse({"status": "ok", "sessions": len(self.live)})
        if path == "/stats":
            return JSONResponse(await self.stats())
        if path == "/ice-servers":
            return JSONResponse({"iceServers": self.ice_servers})
        if path == "/offer" and method == "POST":
            return await self.offer(request)
        if path.startswith("/session/"):
            sid = path.split("/")[2]
            if method == "DELETE" and sid in self.live:
                self.live.pop(sid)[0].cancel()
                self.ended[sid] = "stopped"
                return JSONResponse({"stopped": True})
            if method == "GET" and (sid in self.live or sid in self.ended):
                return JSONResponse({"session": sid, "state": "running" if sid in self.live else "ended",
                                     "replica": self.live[sid][1] if sid in self.live else None,
                                     "reason": self.ended.get(sid)})
            if method == "POST" and path.endswith("/prompt"):
                return JSONResponse({"error": "over Ray, change the prompt on the session's data channel"},
                                    status_code=409)
            return JSONResponse({"error": "no such session"}, status_code=404)
        return JSONResponse({"error": "not found"}, status_code=404)

    async def stats(self) -> dict:
        replicas = await self.board.read.remote()
        return {"replicas": replicas, "sessions": [s for r in replicas for s in r["sessions"]],
                "max_sessions": sum(r["max_sessions"] for r in replicas), "refused": self.refused,
                "ended": self.ended}

    async def offer(self, request):
        from ray.serve.exceptions import BackPressureError
        from starlette.responses import JSONResponse

        body = await request.body()
        if len(body) > self.max_body:
            self.refused["malformed"] += 1
            return JSONResponse({"error": f"request body over {self.max_body} bytes"}, status_code=413)
        call = self.replicas.options(stream=True).session.remote(body)
        try:
            first = await asyncio.wait_for(call.__anext__(), self.queue_timeout)
        except (BackPressureError, TimeoutError):
            call.cancel()
            self.refused["busy"] += 1
            return JSONResponse({"error": "cluster busy: every replica's sessions are in use, try again when one "
                                          "ends"}, status_code=503)
        status, replica = first.pop("status"), first.pop("replica")
        if status != 200:
            return JSONResponse(first, status_code=status)
        sid = first["session"]
        self.live[sid] = (call, replica)
        asyncio.ensure_future(self._follow(sid, call))
        return JSONResponse({**first, "replica": replica})

    async def _follow(self, sid: str, call) -> None:
        """Wait for the session's call to end: normally, or with its replica lost."""
        try:
            async for _ in call:
                pass
            reason = "ended"
        except asyncio.CancelledError:
            reason = "stopped"
        except Exception as exc:  # noqa: BLE001 - any failure of the call: its replica died or was removed
            reason = f"replica lost: {type(exc).__name__}"
        if sid in self.live:
            self.live.pop(sid)
            self.ended[sid] = reason


def deployments(*, slots: int = 2, gpus: float = 1.0, replicas: int | None = 1, autoscaling: dict | None = None,
                token: str | None = None, queue_timeout: float = 5.0, drain_s: float = 60.0, **replica_kw):
    """The bound app: the ingress over ``StreamReplica`` (fixed ``replicas``, or ``autoscaling``: Ray's
    autoscaling_config, e.g. {"min_replicas": 1, "max_replicas": 4, "target_ongoing_requests": slots})."""
    replica = serve.deployment(StreamReplica).options(
        ray_actor_options={"num_gpus": gpus, "num_cpus": 1}, max_ongoing_requests=slots, max_queued_requests=1,
        graceful_shutdown_timeout_s=drain_s, graceful_shutdown_wait_loop_s=1.0,
        **({"autoscaling_config": autoscaling} if autoscaling else {"num_replicas": replicas}))
    ingress = serve.deployment(Ingress).options(ray_actor_options={"num_cpus": 0}, max_ongoing_requests=1000)
    return ingress.bind(replica.bind(slots=slots, **replica_kw), token=token, queue_timeout=queue_timeout,
                        ice_servers=(replica_kw.get("server") or {}).get("ice_servers"))


def build_app(args: dict):
    """``serve run streamedit.scale.serve_app:build_app key=value ...`` (numbers as text, autoscaling as JSON)."""
    kw = dict(args)
    for k in ("slots", "replicas", "steps", "te_size", "threads"):
        if k in kw:
            kw[k] = int(kw[k])
    for k in ("gpus", "queue_timeout", "drain_s"):
        if k in kw:
            kw[k] = float(kw[k])
    if isinstance(kw.get("autoscaling"), str):  # autoscaling='{"min_replicas": 1, "max_replicas": 4, ...}'
        kw["autoscaling"] = json.loads(kw["autoscaling"])
    return deployments(**kw)
