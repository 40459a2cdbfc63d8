"""The media path of `streamedit serve` alone: a server whose engine hands every frame back unchanged, and
the load generator against it. End-to-end latency is then WebRTC + VP8 both ways + the server's plumbing,
with no model: the floor that `serve` adds to the engine's own time at a given size and rate.

    python scripts/serve_transport.py --size 512 --fps 30 --seconds 20 --json out/transport.json
    python scripts/serve_transport.py --size 512 --fps 30 --seconds 20 --upstream-buffer

``--upstream-buffer`` gives both ends aiortc's own jitter buffer (a frame complete only when the next one
begins) instead of serve/rtp.py's, for an A/B in one checkout. The server runs in a child process, as
`serve` would, so client and server codecs do not share one interpreter.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import subprocess
import sys
import time
import urllib.request

from aiohttp import web

from streamedit.serve import client as serve_client, server as serve_server
from streamedit.serve.load import format_table, run_load


class Echo:
    """The engine's place in a session: the frame at its working size, unchanged."""

    def set_prompt(self, prompt):
        pass

    def process(self, frames):
        return list(frames)


def use_upstream_buffer() -> None:
    keep = lambda pc, track: False  # noqa: E731  (decode_on_marker's "left aiortc's buffer" answer)
    serve_server.decode_on_marker = serve_client.decode_on_marker = keep


def run_server(args) -> None:
    if args.upstream_buffer:
        use_upstream_buffer()
    config = serve_server.ServerConfig(port=args.port, size=args.size, max_sessions=args.sessions,
                                       ice_hosts=["127.0.0.1"], trace=True, model_name="echo")
    server = serve_server.Server(config, lambda prompt, size: Echo())
    web.run_app(server.app(), host="127.0.0.1", port=args.port, print=None)


def wait_healthy(url: str, proc: subprocess.Popen, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            sys.exit(f"the echo server exited ({proc.returncode})")
        try:
            with urllib.request.urlopen(url + "/health", timeout=1):
                return
        except OSError:
            time.sleep(0.2)
    sys.exit("the echo server did not start")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sessions", type=int, default=1)
    ap.add_argument("--fps", type=float, default=30)
    ap.add_argument("--seconds", type=float, default=20)
    ap.add_argument("--size", type=int, default=512, help="working size (long side); the camera sends 4:3 at it")
    ap.add_argument("--upstream-buffer", action="store_true", help="aiortc's jitter buffer at both ends")
    ap.add_argument("--json")
    ap.add_argument("--port", type=int, help=argparse.SUPPRESS)  # set: this process is the server
    args = ap.parse_args()
    if args.port:
        return run_server(args)
    if args.upstream_buffer:
        use_upstream_buffer()
    serve_server.restrict_ice_hosts(["127.0.0.1"])  # aioice leaves loopback out by default
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, __file__, *sys.argv[1:], "--port", str(port)])
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, proc)
        height = args.size * 3 // 4
        report = asyncio.run(run_load(url, args.sessions, args.fps, args.seconds, size=args.size,
                                      width=args.size, height=height, prompt_change=False))
    finally:
        proc.terminate()
        proc.wait(10)
    report["receive_buffer"] = "aiortc" if args.upstream_buffer else "serve/rtp.py FrameJitterBuffer"
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    print(f"receive buffer: {report['receive_buffer']}")
    print(format_table(report))


if __name__ == "__main__":
    main()
