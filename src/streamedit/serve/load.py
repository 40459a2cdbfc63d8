"""The load generator's run and its numbers (serve/bench.py is the command).

N WebRTC sessions, each with its own synthetic pattern and prompt, stream at ``fps`` against a server. After
every session has its first frame and ``warmup`` seconds more, a window of ``seconds`` is measured; halfway
through it every session changes its prompt. Streaming goes on for ``drain`` seconds after the window so that
frames captured at its end can still come back. Per session (see :func:`analyse` for the exact definitions):
served fps, end-to-end latency p50/p95/p99, drops, and the prompt switch.
"""

from __future__ import annotations

import asyncio
import time
from urllib.parse import parse_qs, urlsplit

import numpy as np

from .client import Client, SyntheticCamera, pattern_colour

PROMPTS = ("oil painting", "watercolor", "pencil sketch", "charcoal drawing", "pop art poster",
           "ukiyo-e woodblock print", "neon cyberpunk", "pixel art", "stained glass", "van gogh style")
PROMPT_TARGET = 2  # at most this many stale frames after a prompt change (issue 25)


class LoadError(Exception):
    """The run could not happen (server unreachable, session refused): one line for the user."""


def prompts_for(k: int) -> tuple[str, str]:
    """Session ``k``'s first prompt and the one it switches to; distinct across sessions."""
    n = len(PROMPTS)
    first, second = PROMPTS[k % n], PROMPTS[(k + n // 2) % n]
    if k >= n:
        first, second = f"{first} #{k}", f"{second} #{k}"
    return first, second


def quantile_ms(values: list[float], q: float) -> float | None:
    return round(1000 * float(np.quantile(values, q)), 1) if values else None


def analyse(client: Client, t0: float, t1: float, t_change: float | None, new_prompt: str | None,
            arrivals: list[tuple[float, int]]) -> dict:
    """One session's numbers over the window [t0, t1] (client clock; ``arrivals`` frozen after the drain).

    * ``sent_fps``: camera frames captured in the window / its length (the client's own pace).
    * ``served_fps``: frames received in the window / its length.
    * ``e2e_ms_*``: for received frames whose input was captured in the window, arrival - capture.
    * ``drops``: frames captured in the window that never came back (the server's latest-frame-wins, its output
      queue, the network; anything that had not come back ``drain`` s after the window counts too).
    * prompt switch, with ``t_change`` the moment the client sent the new prompt: ``prompt_stale_frames`` =
      received frames made from an input captured after ``t_change`` but with a prompt other than the new one
      (the check: at most 2); ``prompt_frames_until_new`` = frames received after ``t_change`` before the first
      one made with the new prompt (includes frames already in flight); ``prompt_switch_ms`` = ``t_change`` to
      that first frame's arrival. Which prompt made a frame is what the server's trace says.
    """
    cam = client.camera
    span = max(t1 - t0, 1e-9)
    window = {pts for pts, t in cam.captured.items() if t0 <= t <= t1}
    returned, e2e, untraced = set(), [], 0
    stale, until_new, first_new = 0, 0, None
    for received, pts in arrivals:
        traced = client.traced(pts)
        if traced is None:
            untraced += 1
            continue
        in_pts, prompt = traced
        captured = client.captured_at(in_pts)
        if captured is None:
            continue
        key = next((p for p in (in_pts, in_pts - 1, in_pts + 1, in_pts - 2, in_pts + 2) if p in window), None)
        if key is not None:
            returned.add(key)
            e2e.append(received - captured)
        if t_change is not None and received >= t_change:
            if prompt == new_prompt and first_new is None:
                first_new = received
            elif prompt != new_prompt:
                until_new += first_new is None
                stale += captured >= t_change
    out = {
        "session": client.session, "pattern": cam.pattern, "colour": list(pattern_colour(cam.pattern)),
        "input": f"{cam.width}x{cam.height}", "sent": len(window), "received": len(returned),
        "sent_fps": round(len(window) / span, 2),
        "served_fps": round(sum(t0 <= t <= t1 for t, _ in arrivals) / span, 2),
        "e2e_ms_p50": quantile_ms(e2e, 0.5), "e2e_ms_p95": quantile_ms(e2e, 0.95),
        "e2e_ms_p99": quantile_ms(e2e, 0.99), "e2e_ms_max": quantile_ms(e2e, 1.0),
        "drops": len(window) - len(returned), "drop_pct": round(100 * (1 - len(returned) / max(len(window), 1)), 1),
        "untraced_frames": untraced,
    }
    if t_change is not None:
        out |= {"new_prompt": new_prompt, "prompt_stale_frames": stale if first_new is not None else None,
                "prompt_frames_until_new": until_new if first_new is not None else None,
                "prompt_switch_ms": round(1000 * (first_new - t_change), 1) if first_new is not None else None,
                "prompt_ok": first_new is not None and stale <= PROMPT_TARGET}
    server = client.stats() or {}
    out["server"] = {k: server.get(k) for k in ("latency_ms_p50", "latency_ms_p95", "dropped_input",
                                                 "dropped_output", "prompt_switch_frames", "working_size", "error")}
    return out


def split_url(url: str, token: str | None) -> tuple[str, dict]:
    """Base URL and auth headers (a ``?token=`` in the URL, as `serve` prints it, works as ``--token``)."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise LoadError(f"--url must be http(s)://host:port/, got {url!r}")
    token = token or (parse_qs(parts.query).get("token") or [None])[0]
    return f"{parts.scheme}://{parts.netloc}", ({"Authorization": f"Bearer {token}"} if token else {})


async def run_load(url: str, sessions: int, fps: float, seconds: float, *, size: int | None = None,
                   width: int = 320, height: int = 240, warmup: float = 2.0, drain: float = 1.5,
                   token: str | None = None, prompt_change: bool = True, prompt_api: str = "channel",
                   keep_pixels: bool = False, first_frame_timeout: float = 300.0, clients: list | None = None) -> dict:
    """Run the load against the server at ``url``; returns the report (``clients``: filled with the sessions)."""
    import aiohttp

    base, headers = split_url(url, token)
    clients = [] if clients is None else clients
    async with aiohttp.ClientSession(headers=headers, timeout=aiohttp.ClientTimeout(total=60)) as http:
        async def post(path, data):
            async with http.post(base + path, json=data) as resp:
                return resp.status, await _json(resp)

        async def stats():
            async with http.get(base + "/stats") as resp:
                if resp.status != 200:
                    raise LoadError(f"GET /stats: HTTP {resp.status}: {(await _json(resp)).get('error', '')}")
                return await resp.json()

        try:
            before = await stats()
            async with http.get(base + "/ice-servers") as resp:  # STUN/TURN, as the page takes them
                ice_servers = (await _json(resp)).get("iceServers") if resp.status == 200 else None
        except aiohttp.ClientError as exc:
            raise LoadError(f"cannot reach the server at {base}: {exc}") from None
        try:
            for k in range(sessions):
                client = Client(SyntheticCamera(width, height, fps, pattern=k), ice_servers=ice_servers)
                client.keep_pixels = keep_pixels
                clients.append(client)
                params = {"prompt": prompts_for(k)[0], "trace": True} | ({"size": size} if size else {})
                status, body = await client.offer(post, **params)
                if status != 200:
                    raise LoadError(f"session {k}: the server refused it: HTTP {status}: {body.get('error', body)}")
            t_start = time.monotonic()
            for client in clients:
                await client.wait(lambda c=client: c.arrivals, max(1.0, first_frame_timeout - (time.monotonic()
                                  - t_start)), f"the first frame of session {clients.index(client)}")
            await asyncio.sleep(warmup)
            at_start = await stats()  # the engines are built by now: memory from here on should stay flat
            t0 = time.monotonic()
            changes: list = [(None, None)] * sessions
            if prompt_change:
                await asyncio.sleep(seconds / 2)
                changes = [await change_prompt(c, prompts_for(k)[1], prompt_api, post) for k, c in enumerate(clients)]
                await asyncio.sleep(max(0.0, t0 + seconds - time.monotonic()))
            else:
                await asyncio.sleep(seconds)
            t1 = time.monotonic()
            await asyncio.sleep(drain)
            frozen = [list(c.arrivals) for c in clients]
            # the server pushes its trace every stats interval: wait until it covers every frozen arrival
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline and any(c.traced(p) is None for c, a in zip(clients, frozen)
                                                      for _, p in a[-3:]):
                await asyncio.sleep(0.1)
            after = await stats()
        except TimeoutError as exc:
            raise LoadError(str(exc)) from None
        finally:
            await asyncio.gather(*(c.close() for c in clients), return_exceptions=True)
    rows = [analyse(c, t0, t1, t, prompts_for(k)[1] if t else None, a)
            for k, (c, (t, _), a) in enumerate(zip(clients, changes, frozen))]
    return {"url": base, "model": before.get("model"), "sessions": rows, "summary": summarise(rows),
            "window_s": round(t1 - t0, 2), "fps": fps, "input": f"{width}x{height}", "size": size,
            "server_process": {"before": at_start.get("process"), "after": after.get("process")}}


async def change_prompt(client: Client, prompt: str, api: str, post) -> tuple[float, str]:
    import json

    t = time.monotonic()
    if api == "http":
        status, body = await post(f"/session/{client.session}/prompt", {"prompt": prompt})
        if status != 200:
            raise LoadError(f"prompt change refused: HTTP {status}: {body.get('error', body)}")
    else:
        client.channel.send(json.dumps({"type": "prompt", "prompt": prompt}))
    return t, prompt


async def _json(resp) -> dict:
    try:
        body = await resp.json(content_type=None)
    except ValueError:
        body = None
    return body if isinstance(body, dict) else {"error": f"not JSON (HTTP {resp.status})"}


def summarise(rows: list[dict]) -> dict:
    def worst(key, fn):
        vals = [r[key] for r in rows if r.get(key) is not None]
        return fn(vals) if vals else None

    out = {"sessions": len(rows), "min_served_fps": worst("served_fps", min),
           "max_e2e_ms_p50": worst("e2e_ms_p50", max), "max_e2e_ms_p95": worst("e2e_ms_p95", max),
           "max_e2e_ms_p99": worst("e2e_ms_p99", max), "drops": sum(r["drops"] for r in rows),
           "sent": sum(r["sent"] for r in rows)}
    if rows and "prompt_ok" in rows[0]:
        out["prompt_ok"] = all(r["prompt_ok"] for r in rows)
        out["max_prompt_stale_frames"] = worst("prompt_stale_frames", max)
    return out


def format_table(report: dict) -> str:
    head = ("session", "prompt", "sent fps", "served fps", "e2e p50", "p95", "p99", "drops", "prompt switch")
    lines = []
    for k, r in enumerate(report["sessions"]):
        if "prompt_ok" not in r:
            switch = "—"
        elif r["prompt_stale_frames"] is None:
            switch = "NEVER (FAIL)"
        else:
            switch = (f"{r['prompt_stale_frames']} stale, {r['prompt_frames_until_new']} in flight, "
                      f"{r['prompt_switch_ms']:.0f} ms" + ("" if r["prompt_ok"] else " (FAIL)"))
        lines.append((f"{k} {r['session'] or ''}", prompts_for(k)[0], f"{r['sent_fps']:.1f}", f"{r['served_fps']:.1f}",
                      *(_ms(r[f"e2e_ms_{q}"]) for q in ("p50", "p95", "p99")),
                      f"{r['drops']} ({r['drop_pct']:.1f}%)", switch))
    widths = [max(len(str(row[i])) for row in [head, *lines]) for i in range(len(head))]
    text = ["  ".join(str(v).ljust(w) for v, w in zip(row, widths)).rstrip() for row in [head, *lines]]
    s = report["summary"]
    text.append(f"window {report['window_s']} s at {report['fps']:g} fps, input {report['input']}: "
                f"min served {s['min_served_fps']} fps, worst p95 {_ms(s['max_e2e_ms_p95'])}, "
                f"drops {s['drops']}/{s['sent']}" + (f", prompt switch {'ok' if s['prompt_ok'] else 'FAIL'}"
                                                      if "prompt_ok" in s else ""))
    proc = report.get("server_process") or {}
    if proc.get("before") and proc.get("after"):
        b, a = proc["before"], proc["after"]
        text.append("server process (window start -> end): " + ", ".join(
            f"{name} {b[key]} -> {a[key]}" for key, name in (("threads", "threads"), ("rss_mib", "RSS MiB"),
                                                            ("gpu_allocated_mib", "GPU allocated MiB"),
                                                            ("gpu_reserved_mib", "GPU reserved MiB"))
            if b.get(key) is not None and a.get(key) is not None))
    return "\n".join(text)


def _ms(v) -> str:
    return "—" if v is None else f"{v:.0f} ms"
