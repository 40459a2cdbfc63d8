"""`streamedit serve`: an aiohttp app that serves the page and stylizes browser video over WebRTC.

Routes: ``GET /`` (the page), ``/static/*``, ``GET /health``, ``GET /stats`` (JSON), ``POST /offer``
(WebRTC offer -> answer, starts a session), ``POST /session/{id}/prompt`` and ``DELETE /session/{id}``.
Prompt changes and stats also travel on the session's WebRTC data channel ("control"); a session whose offer
asked for ``"trace": true`` also gets which input frame and prompt made each output frame (serve/bench.py).
Loopback checks, access tokens and the addresses WebRTC media may use are serve/network.py.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import os
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from aiohttp import web
from aiortc import RTCPeerConnection, RTCSessionDescription
from aiortc.sdp import SessionDescription

from ..config import check_prompt
from .network import LOOPBACK_NAMES, filter_candidates, request_token, restrict_ice_hosts, rtc_configuration
from .network import is_loopback as is_loopback, new_token as new_token  # re-exported: serve/commands.py, scale/
from .rtp import decode_on_marker
from .session import Session
from .tracks import StylizedTrack, discard, drain

log = logging.getLogger(__name__)
STATIC = Path(__file__).with_name("static")
PUBLIC_PATHS = ("/health", "/static/", "/favicon.ico")


@dataclass
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 7860
    token: str | None = None          # required on every request except /health and /static when set
    prompt: str = "oil painting"
    size: int = 256                   # default processing size (long side; the input's aspect is kept)
    crop: bool = False                # centre-crop to a square instead
    max_size: int = 512               # largest size a client may ask for
    max_sessions: int = 2
    max_pending: int = 8              # offers negotiated at once (no engine runs before a session starts)
    max_input_pixels: int = 1920 * 1080
    max_message_bytes: int = 4096     # data-channel messages
    max_body_bytes: int = 64 * 1024   # HTTP request bodies (offers)
    max_queue: int = 1                # input frames kept per session (latest-frame-wins beyond this)
    connect_timeout: float = 20.0     # seconds for a session's WebRTC connection to come up
    ice_hosts: list[str] | None = None  # local addresses for WebRTC media (None: all interfaces)
    ice_servers: list[dict] | None = None  # STUN/TURN for both ends (network.parse_ice_servers; None: host only)
    stats_interval: float = 0.5
    trace: bool = False               # every session keeps (output pts, input pts, prompt) per frame (an offer
                                      # may ask for it too: "trace": true) and pushes it on its data channel
    model_name: str = ""
    extra: dict = field(default_factory=dict)


class Server:
    def __init__(self, config: ServerConfig, engine_factory: Callable):
        self.config = config
        self.engine_factory = engine_factory
        self.sessions: dict[str, Session] = {}
        self.pcs: dict[str, RTCPeerConnection] = {}
        self.pending = 0  # offers being negotiated
        self.refused = {"auth": 0, "busy": 0, "malformed": 0, "messages": 0}
        self.engine_lock = threading.Lock()  # one model shared by all sessions: one batch at a time
        self.started = time.monotonic()
        if config.ice_hosts:
            restrict_ice_hosts(config.ice_hosts)

    # ---- app ------------------------------------------------------------------------------
    def app(self) -> web.Application:
        app = web.Application(client_max_size=self.config.max_body_bytes, middlewares=[self.guard])
        app.router.add_get("/", self.index)
        app.router.add_get("/health", self.health)
        app.router.add_get("/stats", self.stats)
        app.router.add_get("/ice-servers", self.ice_servers)
        app.router.add_post("/offer", self.offer)
        app.router.add_post("/session/{sid}/prompt", self.prompt)
        app.router.add_delete("/session/{sid}", self.stop)
        app.router.add_static("/static/", STATIC, show_index=False)
        app.on_shutdown.append(self.shutdown)
        return app

    @web.middleware
    async def guard(self, request: web.Request, handler):
        cfg = self.config
        public = request.path.startswith(PUBLIC_PATHS)
        if cfg.token is None:
            # Loopback without a token: refuse foreign Host headers (DNS rebinding) and cross-site writes.
            if request.host.rsplit(":", 1)[0] not in LOOPBACK_NAMES:
                return refuse(403, f"host {request.host!r} not allowed: this server only answers on localhost")
        elif not public and not hmac.compare_digest(request_token(request).encode(), cfg.token.encode()):
            self.refused["auth"] += 1
            if request.path == "/":
                return web.Response(status=401, content_type="text/html", text=NEED_TOKEN_PAGE)
            return refuse(401, "missing or wrong access token (see the URL printed by 'streamedit serve')")
        origin = request.headers.get("Origin")
        if request.method not in ("GET", "HEAD") and origin and origin.split("://", 1)[-1] != request.host:
            return refuse(403, f"cross-origin request from {origin!r} refused")
        try:
            return await handler(request)
        except web.HTTPRequestEntityTooLarge:
            return refuse(413, f"request body over this server's limit of {cfg.max_body_bytes} bytes")

    async def index(self, request):
        return web.FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-store"})

    def _engine_error(self) -> str | None:
        error = getattr(self.engine_factory, "error", None)  # a shared engine's, once it stopped
        return error() if error is not None else None

    async def ice_servers(self, request):
        """The STUN/TURN servers the page gives its RTCPeerConnection (the same the server gathers with)."""
        return web.json_response({"iceServers": self.config.ice_servers or []})

    async def health(self, request):
        error = self._engine_error()
        return web.json_response({"status": "error" if error else "ok", "sessions": len(self.sessions),
                                  **({"error": error} if error else {})})

    async def stats(self, request):
        """Sessions (each: served fps, latency p50/p95 arrival -> encoder, drops) and, with the shared engine,
        its report: per-stream fps / latency / latest-frame-wins drops, batch-size histogram, busy share."""
        report = getattr(self.engine_factory, "report", lambda: None)()
        engine = {"shared": bool(getattr(self.engine_factory, "is_shared", False)),
                  "preset": getattr(self.engine_factory, "preset", None), **jsonable(report or {})}
        return web.json_response({
            "model": self.config.model_name, "uptime_s": round(time.monotonic() - self.started, 1),
            "engine": engine,
            "sessions": [s.snapshot() for s in self.sessions.values()], "max_sessions": self.config.max_sessions,
            "pending": self.pending, "refused": self.refused, "process": process_stats(),
            "defaults": {"size": self.config.size, "prompt": self.config.prompt},
            "limits": {"max_input_pixels": self.config.max_input_pixels, "max_size": self.config.max_size,
                       "max_message_bytes": self.config.max_message_bytes,
                       "max_body_bytes": self.config.max_body_bytes},
        })

    # ---- sessions -------------------------------------------------------------------------
    async def offer(self, request):
        cfg = self.config
        try:  # cheap checks first: malformed offers never take a session slot
            params = parse_offer(await request.read(), cfg)
        except ValueError as exc:
            self.refused["malformed"] += 1
            return refuse(400, f"malformed offer: {exc}")
        if len(self.sessions) >= cfg.max_sessions or self.pending >= cfg.max_pending:
            return self._busy()
        if (error := self._engine_error()) is not None:
            self.refused["busy"] += 1
            return refuse(503, error)
        self.pending += 1
        pc = session = None
        try:
            sid = uuid.uuid4().hex[:12]
            pc = RTCPeerConnection(rtc_configuration(cfg.ice_servers))  # none given: nothing leaves this host
            session = Session(sid, self.engine_factory, params["prompt"], params["size"], asyncio.get_running_loop(),
                              max_queue=cfg.max_queue, max_input_pixels=cfg.max_input_pixels,
                              engine_lock=self.engine_lock, trace=cfg.trace or params["trace"], crop=cfg.crop,
                              track_factory=StylizedTrack)
            self._wire(pc, session)
            sdp = filter_candidates(params["sdp"], cfg.ice_hosts)
            await asyncio.wait_for(pc.setRemoteDescription(RTCSessionDescription(sdp=sdp, type="offer")), 10)
            if not any(sender.track is session.track for sender in pc.getSenders()):
                raise ValueError("the offer sends no video track")
            await asyncio.wait_for(pc.setLocalDescription(await pc.createAnswer()), 15)
        except Exception as exc:
            self.pending -= 1
            self.refused["malformed"] += 1
            await self._discard(session, pc)
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
            return refuse(400, f"malformed offer: {first}")
        self.pending -= 1
        if len(self.sessions) >= cfg.max_sessions:  # another offer won the last slot meanwhile
            await self._discard(session, pc)
            return self._busy()
        self.sessions[sid], self.pcs[sid] = session, pc
        session.start()
        asyncio.get_running_loop().call_later(cfg.connect_timeout, self._check_connected, sid)
        log.info("session %s started (%d/%d)", sid, len(self.sessions), cfg.max_sessions)
        return web.json_response({"sdp": pc.localDescription.sdp, "type": pc.localDescription.type,
                                  "session": sid, "size": session.size, "prompt": session.prompt})

    @staticmethod
    async def _discard(session: Session | None, pc: RTCPeerConnection | None) -> None:
        if session is not None:
            for task in session.tasks:
                task.cancel()
            await session.close()
        if pc is not None:
            await pc.close()

    def _busy(self) -> web.Response:
        self.refused["busy"] += 1
        n = self.config.max_sessions
        return refuse(503, f"server busy: {n} of {n} sessions in use, try again when one ends")

    def _wire(self, pc: RTCPeerConnection, session: Session) -> None:
        sid = session.id
        tasks = session.tasks

        def on_error(message: str) -> None:
            if self._send(session, {"type": "error", "error": message}, hold=True):
                self._end(sid)
            else:  # a frame can be decoded before the data channel is up: end once the client has been told
                asyncio.get_running_loop().call_later(self.config.connect_timeout, self._end, sid)

        session.on_error = on_error

        @pc.on("track")
        def on_track(track):
            if track.kind == "video" and not tasks:
                decode_on_marker(pc, track)  # each camera frame decoded when complete, not a frame later
                pc.addTrack(session.track)
                tasks.append(asyncio.ensure_future(drain(track, session)))
            else:  # audio or extra tracks: read and drop, so nothing piles up
                tasks.append(asyncio.ensure_future(discard(track)))

        @pc.on("datachannel")
        def on_datachannel(channel):
            if session.channel is not None:  # one control channel per session
                channel.close()
                return
            session.channel = channel
            channel.on("message", lambda msg: self._on_message(session, msg))
            channel.on("open", lambda: self._flush(session))
            self._flush(session)
            tasks.append(asyncio.ensure_future(self._push_stats(session, channel)))

        @pc.on("connectionstatechange")
        async def on_state():
            if pc.connectionState in ("failed", "closed"):
                self._end(sid)
            elif pc.connectionState == "disconnected":
                asyncio.get_running_loop().call_later(5, self._check_connected, sid)

    def _on_message(self, session: Session, message) -> None:
        try:
            if not isinstance(message, str):
                raise ValueError("messages must be JSON text")
            if len(message.encode()) > self.config.max_message_bytes:
                raise ValueError(f"message over {self.config.max_message_bytes} bytes")
            msg = json.loads(message)
            if not isinstance(msg, dict) or msg.get("type") not in ("prompt", "ping"):
                raise ValueError("unknown message (expected {'type': 'prompt'|'ping', ...})")
            if msg["type"] == "prompt":
                prompt = session.set_prompt(msg.get("prompt"))
                self._send(session, {"type": "prompt", "prompt": prompt})
            else:
                self._send(session, {"type": "pong", "t": msg.get("t") if isinstance(msg.get("t"), (int, float))
                                     else None})
        except (ValueError, RecursionError) as exc:
            self.refused["messages"] += 1
            self._send(session, {"type": "error", "error": f"message refused: {exc}"[:300]})

    def _send(self, session: Session, payload: dict, hold: bool = False) -> bool:
        """Send ``payload`` on the session's data channel; True if sent. ``hold``: keep it for the channel's
        opening instead of dropping it."""
        channel = session.channel
        if channel is None or channel.readyState != "open":
            if hold and len(session.outbox) < 8:
                session.outbox.append(payload)
            return False
        # a client that floods and never reads gets no more replies once 256 KiB are waiting
        if channel.bufferedAmount >= 256 * 1024:
            return False
        channel.send(json.dumps(payload))
        return True

    def _flush(self, session: Session) -> None:
        channel = session.channel
        if channel is None or channel.readyState != "open" or not session.outbox:
            return
        held, session.outbox = session.outbox, []
        for payload in held:
            self._send(session, payload)
        if session.error is not None and any(p.get("type") == "error" for p in held):
            self._end(session.id)  # the client now knows why its session ends

    async def _push_stats(self, session: Session, channel) -> None:
        pushed = 0  # frames whose trace the client has
        while not session.closed:
            if channel.readyState == "open":
                channel.send(json.dumps({"type": "stats", **session.snapshot()}))
                if session.trace is not None and session.stats.sent > pushed:
                    # one entry per frame sent, appended on this loop: the newest (sent - pushed) are new
                    new = list(session.trace)[-(session.stats.sent - pushed):]
                    pushed = session.stats.sent
                    for i in range(0, len(new), 200):
                        channel.send(json.dumps({"type": "trace", "frames": new[i:i + 200]}))
            elif channel.readyState == "closed":
                return
            await asyncio.sleep(self.config.stats_interval)

    def _check_connected(self, sid: str) -> None:
        pc = self.pcs.get(sid)
        if pc is not None and pc.connectionState != "connected":
            log.info("session %s: WebRTC connection not up (%s), closing", sid, pc.connectionState)
            self._end(sid)

    def _end(self, sid: str) -> None:
        if sid in self.sessions:
            asyncio.ensure_future(self.close_session(sid))

    async def close_session(self, sid: str) -> bool:
        session, pc = self.sessions.pop(sid, None), self.pcs.pop(sid, None)
        if session is None:
            return False
        for task in session.tasks:
            task.cancel()
        await session.close()
        if pc is not None:
            await pc.close()
        log.info("session %s closed (%d left)", sid, len(self.sessions))
        return True

    async def prompt(self, request):
        session = self.sessions.get(request.match_info["sid"])
        if session is None:
            return refuse(404, "no such session")
        try:
            body = json.loads(await request.read())
            prompt = session.set_prompt(body.get("prompt") if isinstance(body, dict) else None)
        except ValueError as exc:
            self.refused["messages"] += 1
            return refuse(400, f"bad prompt request: {exc}")
        return web.json_response({"prompt": prompt})

    async def stop(self, request):
        if not await self.close_session(request.match_info["sid"]):
            return refuse(404, "no such session")
        return web.json_response({"stopped": True})

    async def shutdown(self, app=None):
        await asyncio.gather(*(self.close_session(sid) for sid in list(self.sessions)))


def process_stats() -> dict:
    """This process's threads, resident memory and (once torch has used CUDA) GPU memory: leaks show here."""
    import sys

    out = {"threads": threading.active_count(), "rss_mib": None, "gpu_allocated_mib": None, "gpu_reserved_mib": None}
    try:
        with open("/proc/self/statm") as f:
            out["rss_mib"] = round(int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20, 1)
    except (OSError, ValueError, IndexError):
        pass
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        out["gpu_allocated_mib"] = round(torch.cuda.memory_allocated() / 2**20, 1)
        out["gpu_reserved_mib"] = round(torch.cuda.memory_reserved() / 2**20, 1)
    return out


def parse_offer(body: bytes, cfg: ServerConfig) -> dict:
    try:
        data = json.loads(body)
    except (ValueError, RecursionError):
        raise ValueError("body is not JSON") from None
    if not isinstance(data, dict):
        raise ValueError("body must be a JSON object")
    sdp, kind = data.get("sdp"), data.get("type")
    if kind != "offer":
        raise ValueError("'type' must be 'offer'")
    if not isinstance(sdp, str) or not sdp.startswith("v=0") or "m=video" not in sdp:
        raise ValueError("'sdp' must be an SDP offer with a video section")
    try:
        media = SessionDescription.parse(sdp).media
    except Exception as exc:  # aiortc's parser raises whatever the garbage provokes
        raise ValueError(f"unreadable SDP ({type(exc).__name__})") from None
    if not any(m.kind == "video" and m.direction in ("sendrecv", "sendonly") and m.fmt for m in media):
        raise ValueError("the offer must send video (a sendrecv video section)")
    prompt = check_prompt(data.get("prompt", cfg.prompt))
    size = data.get("size", cfg.size)
    if not isinstance(size, int) or isinstance(size, bool) or size % 32 or not 64 <= size <= cfg.max_size:
        raise ValueError(f"'size' must be a multiple of 32 between 64 and {cfg.max_size}")
    trace = data.get("trace", False)
    if not isinstance(trace, bool):
        raise ValueError("'trace' must be true or false")
    return {"sdp": sdp, "prompt": prompt, "size": size, "trace": trace}


def jsonable(value):
    """A report with tuple keys/values (working sizes) as JSON: keys as strings, tuples as lists."""
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    return value


def refuse(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)


NEED_TOKEN_PAGE = """<!doctype html><meta charset="utf-8"><title>streamedit: token needed</title>
<body style="font-family:sans-serif;background:#111;color:#eee;padding:2em">
<h1>Access token needed</h1><p>This streamedit server is reachable from the network, so it needs its access
token. Open the address that <code>streamedit serve</code> printed (it ends in <code>/?token=…</code>).</p>"""
