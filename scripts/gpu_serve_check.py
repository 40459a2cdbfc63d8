"""`streamedit serve` on a GPU with its defaults (issue 25 items 2-3): the shared multi-stream engine with the
exact preset, compiled and graph-captured before the port opens, --max-sessions measured; then N real
WebRTC clients (aiortc) on 127.0.0.1, /stats read back (per-stream fps/latency/drops, batch histogram,
busy share on CUDA events), and one client past --max-sessions refused with 503.

    python scripts/gpu_serve_check.py --model random:real --size 512 --sessions 3 --seconds 20 --json serve.json
    # CPU smoke run of the script itself:
    python scripts/gpu_serve_check.py --model random:tiny --device cpu --size 64 --sessions 2 --seconds 5 \\
        --max-sessions 2
"""

import argparse
import asyncio
import json
import re
import socket
import subprocess
import sys
import threading
import time

import aiohttp

from streamedit.serve.bench import SyntheticCamera, connect
from streamedit.serve.server import restrict_ice_hosts


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(args, port: int) -> tuple[subprocess.Popen, list[str], float]:
    cmd = [sys.executable, "-m", "streamedit", "serve", "--port", str(port), "--model", args.model, "--size",
           str(args.size), "--ice-host", "127.0.0.1"]
    cmd += ["--device", args.device] if args.device else []
    cmd += ["--max-sessions", str(args.max_sessions)] if args.max_sessions else []
    cmd += ["--lllite", args.lllite] if args.lllite else []
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
    lines = []
    while True:  # the port opens after the engine is prepared: the "open" line comes last
        line = proc.stderr.readline()
        if not line:
            raise SystemExit("server exited:\n" + "".join(lines))
        lines.append(line)
        print(line, end="", flush=True)
        if "streamedit serve: open" in line:
            # keep reading its log (a full pipe would block the server)
            threading.Thread(target=lambda: [print(ln, end="", file=sys.stderr) for ln in proc.stderr],
                             daemon=True).start()
            return proc, lines, time.monotonic() - t0


async def check(args, port: int, lines: list[str]) -> dict:
    base = f"http://localhost:{port}"
    async with aiohttp.ClientSession(base_url=base) as http:
        for _ in range(100):
            try:
                async with http.get("/health"):
                    break
            except aiohttp.ClientError:
                await asyncio.sleep(0.1)
        stats = await (await http.get("/stats")).json()
        limit = stats["max_sessions"]
        cams = []
        try:
            for k in range(min(args.sessions, limit)):
                cam, status, body = await connect(http, size=args.size, prompt=("oil painting", "watercolor",
                                                                                 "pencil sketch")[k % 3],
                                                  camera=SyntheticCamera(640, 480, args.fps))
                cams.append(cam)
                assert status == 200, body
            for cam in cams:
                await cam.wait(lambda cam=cam: len(cam.frames) >= 5, 300, "first frames")
            await asyncio.sleep(args.seconds)
            stats = await (await http.get("/stats")).json()
            refusal = None
            if len(cams) == limit <= 8:  # one more than --max-sessions
                extra, status, body = await connect(http, size=args.size)
                await extra.close()
                refusal = {"status": status, "body": body}
                assert status == 503, refusal
        finally:
            for cam in cams:
                await cam.close()
    engine = stats["engine"]
    assert engine["shared"] and engine["busy_clock"] == ("cuda-events" if args.device != "cpu" else "host")
    assert 0 < engine["busy_share"] <= 1 and engine["batches"] > 0, engine
    for session in stats["sessions"]:
        assert engine["streams"][str(session["stream"])]["fps"] > 0, (session, engine)
    return {"startup": [ln.strip() for ln in lines if re.match(r"(engine|compiled|built|max sessions)", ln)],
            "max_sessions": limit, "sessions": stats["sessions"], "engine": engine, "refusal": refusal}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="random:real")
    ap.add_argument("--device", default=None)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--lllite", default=None)
    ap.add_argument("--sessions", type=int, default=3)
    ap.add_argument("--fps", type=float, default=30.0)
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--max-sessions", type=int, default=None, help="default: the server's measured figure")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    port = free_port()
    restrict_ice_hosts(["127.0.0.1"])  # this client's media on loopback too, as the server's (--ice-host)
    proc, lines, startup_s = start_server(args, port)
    try:
        result = asyncio.run(check(args, port, lines))
    finally:
        proc.terminate()
        proc.wait(60)
    result["startup_s"] = round(startup_s, 1)
    text = json.dumps(result, indent=1)
    print(text)
    if args.json:
        with open(args.json, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
