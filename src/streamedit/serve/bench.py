"""Load generator for `streamedit serve`: N real WebRTC sessions (aiortc), each with its own synthetic camera
pattern and prompt, against a running server (``--url``) or one it starts (``--model``, a `streamedit serve`
subprocess on 127.0.0.1); per session served fps, end-to-end latency, drops and a mid-run prompt switch.

    python -m streamedit.serve.bench --sessions 3 --fps 30 --seconds 30 --model random:tiny --size 128
    python -m streamedit.serve.bench --sessions 4 --fps 30 --seconds 60 --url http://127.0.0.1:7860/

End-to-end latency is exact: the server's per-frame trace (asked for in the offer) says which camera frame
made each output frame, and capture and arrival are both timed on the client's clock (capture -> encode ->
network -> decode -> queue -> model -> encode -> network -> decode). The numbers are defined in
serve/load.py (:func:`~streamedit.serve.load.analyse`) and docs/serve.md.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from .client import Client, SyntheticCamera, connect  # noqa: F401  (the tests' client lives here too)
from .load import LoadError, format_table, run_load


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit 2 (argparse would print the whole usage first)
        sys.stderr.write(f"{self.prog}: error: {message}\n")
        sys.exit(2)


def parser() -> argparse.ArgumentParser:
    ap = _Parser(prog="python -m streamedit.serve.bench", description=__doc__.splitlines()[0])
    ap.add_argument("--sessions", type=int, default=1, help="concurrent WebRTC sessions")
    ap.add_argument("--fps", type=float, default=30, help="each camera's frame rate")
    ap.add_argument("--seconds", type=float, default=30, help="measured window (after every session's first "
                    "frame and --warmup)")
    ap.add_argument("--warmup", type=float, default=3)
    ap.add_argument("--drain", type=float, default=1.5, help="seconds streaming goes on after the window, so its "
                    "last frames can come back (a frame not back by then is a drop)")
    ap.add_argument("--size", type=int, default=256, help="processing size each session asks for (long side)")
    ap.add_argument("--input", default=None, help="WxH each camera sends (default: 4:3 with short side = size, "
                    "what the page uploads)")
    ap.add_argument("--prompt-api", choices=("channel", "http"), default="channel",
                    help="how sessions change prompt mid-run: data channel or POST /session/{id}/prompt")
    ap.add_argument("--no-prompt-change", action="store_true")
    ap.add_argument("--json", type=Path, default=None, help="write the report here")
    target = ap.add_argument_group("server (exactly one of --url / --model)")
    target.add_argument("--url", default=None, help="a running `streamedit serve` (a ?token= in it is used)")
    target.add_argument("--token", default=None, help="its access token")
    target.add_argument("--model", default=None, help="start `streamedit serve --model MODEL` on 127.0.0.1 for "
                        "the run (its --max-sessions = --sessions)")
    own = ap.add_argument_group("the server it starts (as in `streamedit serve`)")
    for flag in ("--device", "--dtype", "--lllite", "--revision"):
        own.add_argument(flag, default=None)
    own.add_argument("--steps", type=int, default=None)
    own.add_argument("--te-size", type=int, default=None)
    own.add_argument("--cpu-threads", "--threads", dest="cpu_threads", type=int, default=None)
    own.add_argument("--shared-engine", action="store_true", help="one multi-stream engine for every session")
    own.add_argument("--serve-arg", action="append", default=[], metavar="ARGS",
                     help="more `serve` arguments, passed on verbatim (shell-split; repeatable)")
    own.add_argument("--server-log", type=Path, default=None, help="the server's output (default: a temp file)")
    own.add_argument("--server-timeout", type=float, default=900, help="seconds to wait for the server to start")
    return ap


def check(args, ap) -> tuple[int, int]:
    if (args.url is None) == (args.model is None):
        ap.error("give exactly one of --url (a running server) and --model (start one)")
    for name in ("sessions", "fps", "seconds"):
        if not getattr(args, name) > 0:
            ap.error(f"--{name} must be positive, got {getattr(args, name):g}")
    if args.warmup < 0 or args.drain < 0:
        ap.error("--warmup and --drain must be >= 0")
    if args.size % 32 or not 64 <= args.size <= 2048:
        ap.error(f"--size must be a multiple of 32 from 64, got {args.size}")
    if args.input:
        try:
            width, height = (int(v) for v in args.input.lower().split("x"))
            assert width > 0 and height > 0
        except (ValueError, AssertionError):
            ap.error(f"--input must be WIDTHxHEIGHT, e.g. 640x480, got {args.input!r}")
    else:
        width, height = round(args.size * 4 / 3) // 2 * 2, args.size
    if args.json is not None and not args.json.parent.is_dir():
        ap.error(f"--json: folder {str(args.json.parent)!r} does not exist")
    return width, height


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve_command(args, port: int) -> list[str]:
    cmd = [sys.executable, "-m", "streamedit", "serve", "--host", "127.0.0.1", "--port", str(port),
           "--ice-host", "127.0.0.1", "--model", args.model, "--size", str(args.size),
           "--max-size", str(max(512, args.size)), "--max-sessions", str(args.sessions)]
    for name in ("device", "dtype", "lllite", "revision", "steps", "te_size", "cpu_threads"):
        if getattr(args, name) is not None:
            cmd += ["--" + name.replace("_", "-"), str(getattr(args, name))]
    if args.shared_engine:
        cmd.append("--shared-engine")
    for extra in args.serve_arg:
        cmd += shlex.split(extra)
    return cmd


def start_server(args) -> tuple[subprocess.Popen, str, Path]:
    port = free_port()
    log_path = args.server_log or Path(tempfile.mkstemp(prefix="streamedit-bench-server-", suffix=".log")[1])
    cmd = serve_command(args, port)
    print(f"starting: {shlex.join(cmd[1:])} (log: {log_path})", file=sys.stderr)
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    deadline = time.monotonic() + args.server_timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = log_path.read_text(errors="replace").strip().splitlines()[-1:] or ["(no output)"]
            raise LoadError(f"the server exited ({proc.returncode}) before it was up: {tail[0]} (log: {log_path})")
        try:
            with urllib.request.urlopen(url + "health", timeout=2) as resp:
                if resp.status == 200:
                    return proc, url, log_path
        except OSError:
            time.sleep(0.5)
    stop_server(proc)
    raise LoadError(f"the server was not up after {args.server_timeout:g} s (log: {log_path})")


def stop_server(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)  # aiohttp shuts down cleanly: sessions, then the shared engine
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def main(argv=None) -> None:
    ap = parser()
    args = ap.parse_args(argv)
    width, height = check(args, ap)
    proc = None
    try:
        url = args.url
        if url is None:
            proc, url, _ = start_server(args)
        from urllib.parse import urlsplit

        from .server import is_loopback, restrict_ice_hosts

        if is_loopback(urlsplit(url).hostname or ""):
            restrict_ice_hosts(["127.0.0.1"])  # aioice leaves loopback out by default
        report = asyncio.run(run_load(url, args.sessions, args.fps, args.seconds, size=args.size, width=width,
                                      height=height, warmup=args.warmup, drain=args.drain, token=args.token,
                                      prompt_change=not args.no_prompt_change, prompt_api=args.prompt_api))
    except LoadError as exc:
        sys.stderr.write(f"{ap.prog}: error: {exc}\n")
        sys.exit(2)
    except KeyboardInterrupt:
        sys.exit(130)
    finally:
        if proc is not None:
            stop_server(proc)
    report |= {"command": shlex.join(["python", "-m", "streamedit.serve.bench", *(sys.argv[1:] if argv is None
                                                                                  else argv)]),
               "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"), "host": os.uname().nodename,
               "server_started": proc is not None}
    print(format_table(report))
    if args.json is not None:
        args.json.write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
