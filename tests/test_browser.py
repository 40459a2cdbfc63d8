"""End to end in headless Chromium: fake camera (a y4m clip) -> WebRTC -> `streamedit serve` app on
127.0.0.1 with the tiny random model on CPU -> stylized stream back into the page.

Needs Debian's ``chromium`` (``.ci/browser-deps.sh`` installs it) and the Python ``playwright``
package (its bundled driver only; the browser is the system one, never downloaded). The screenshot
is kept at ``out/test-artifacts/serve.png``. All traffic stays on loopback: the server gathers ICE
candidates on 127.0.0.1 only and drops the browser's other candidates.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import socket
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
if CHROMIUM is None:
    pytest.skip("Debian's chromium is not installed (bash .ci/browser-deps.sh installs it)", allow_module_level=True)
playwright_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright (driver only)")
pytest.importorskip("aiortc")

ARTIFACTS = Path(__file__).resolve().parents[1] / "out" / "test-artifacts"
CHROMIUM_ARGS = [
    "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--disable-features=WebRtcHideLocalIpsWithMdns",
    "--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream", "--allow-loopback-in-peer-connection",
    "--autoplay-policy=no-user-gesture-required",
]


def write_y4m(path: Path, frames: int = 30, width: int = 320, height: int = 240, fps: int = 15) -> Path:
    """A moving colour scene as an uncompressed 4:2:0 y4m (what Chromium's fake camera reads)."""
    import cv2

    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    with open(path, "wb") as fh:
        fh.write(f"YUV4MPEG2 W{width} H{height} F{fps}:1 Ip A1:1 C420jpeg\n".encode())
        for t in range(frames):
            rgb = np.stack([127 + 120 * np.sin((xx + 6 * t) / 23), 127 + 120 * np.cos((yy - 4 * t) / 31),
                            255 * ((xx + yy + 8 * t) % 160) / 160], -1).astype(np.uint8)
            s, cx, cy = 60, 20 + (8 * t) % (width - 80), 30 + (5 * t) % (height - 90)
            rgb[cy:cy + s, cx:cx + s] = (250, 240, 40)
            fh.write(b"FRAME\n" + cv2.cvtColor(rgb, cv2.COLOR_RGB2YUV_I420).tobytes())
    return path


def write_webm(path: Path, frames: int = 30, width: int = 320, height: int = 240) -> Path:
    import av

    with av.open(str(path), "w") as out:
        stream = out.add_stream("libvpx", rate=15)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for t in range(frames):
            img = np.zeros((height, width, 3), np.uint8)
            img[..., 0] = (np.arange(width) * 255 // width)[None]
            img[..., 1] = 40 + 6 * t
            img[60:120, (10 * t) % (width - 60):(10 * t) % (width - 60) + 60] = (250, 240, 40)
            out.mux(stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")))
        out.mux(stream.encode(None))
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ThreadedServer:
    """The aiohttp app on 127.0.0.1:port in a background thread with its own event loop."""

    def __init__(self, server, port: int):
        self.server, self.port = server, port
        self.loop = asyncio.new_event_loop()
        self.ready = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        from aiohttp import web

        asyncio.set_event_loop(self.loop)
        self.runner = web.AppRunner(self.server.app(), access_log=None)
        self.loop.run_until_complete(self.runner.setup())
        self.loop.run_until_complete(web.TCPSite(self.runner, "127.0.0.1", self.port).start())
        self.ready.set()
        self.loop.run_forever()

    def __enter__(self):
        self.thread.start()
        assert self.ready.wait(30), "server did not start"
        return self

    def __exit__(self, *exc):
        asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop).result(30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)

    def get(self, path: str) -> dict:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}", timeout=10) as r:
            return json.loads(r.read())


def wait_for(page, expression: str, timeout_s: float, what: str):
    try:
        page.wait_for_function(expression, timeout=timeout_s * 1000, polling=200)
    except playwright_api.TimeoutError:
        state = page.evaluate("JSON.stringify({...window.streamedit, pc: undefined})")
        raise AssertionError(f"timed out after {timeout_s}s waiting for {what}; page state: {state}") from None


GRAB = """() => {
  const grab = (id) => { const v = document.getElementById(id), c = document.createElement('canvas');
    c.width = c.height = 64; const s = Math.min(v.videoWidth, v.videoHeight);
    c.getContext('2d').drawImage(v, (v.videoWidth - s) / 2, (v.videoHeight - s) / 2, s, s, 0, 0, 64, 64);
    return Array.from(c.getContext('2d').getImageData(0, 0, 64, 64).data); };
  return {input: grab('input'), output: grab('output')};
}"""


@pytest.mark.timeout(300)
def test_browser_end_to_end(tmp_path, tiny_models):
    import torch

    from streamedit.serve.runtime import engine_factory, set_cpu_threads
    from streamedit.serve.server import Server, ServerConfig

    threads = torch.get_num_threads()
    set_cpu_threads(tiny_models)  # as `streamedit serve` does on CPU; restored below
    clip = write_y4m(tmp_path / "clip.y4m")
    server = Server(ServerConfig(ice_hosts=["127.0.0.1"], size=128, model_name="random:tiny"),
                    engine_factory(tiny_models))
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with ThreadedServer(server, free_port()) as srv, playwright_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, timeout=60_000,
                                    args=CHROMIUM_ARGS + [f"--use-file-for-fake-video-capture={clip}"])
        try:
            page = browser.new_page(viewport={"width": 1180, "height": 860})
            errors = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(f"http://127.0.0.1:{srv.port}/", timeout=30_000)
            page.select_option("#size", "128")
            page.click("#start")
            wait_for(page, "window.streamedit.outputFrames >= 5 && window.streamedit.server", 120,
                     "5 stylized frames in the page")
            assert page.evaluate("window.streamedit.status") == "live"

            # The page shows stylized frames: the output is not the input.
            pixels = page.evaluate(GRAB)
            inp, out = (np.array(pixels[k], np.float32).reshape(64, 64, 4)[..., :3] for k in ("input", "output"))
            assert inp.std() > 10, "the fake camera shows nothing"
            assert np.abs(inp - out).mean() > 10, "output pixels look like the input: not stylized"

            # The media went over loopback only. The page fills `pair` from a periodic getStats poll,
            # which under load may not have run yet when the fifth frame arrives.
            wait_for(page, "window.streamedit.browser && window.streamedit.browser.pair", 30,
                     "the browser's selected ICE candidate pair")
            pair = page.evaluate("window.streamedit.browser.pair")
            assert pair and pair["remote"] == "127.0.0.1", pair

            # A prompt change takes effect within a few frames, without stopping the stream.
            sent_before = page.evaluate("window.streamedit.server.sent")
            page.fill("#prompt", "watercolor")
            page.press("#prompt", "Enter")
            wait_for(page, "window.streamedit.server.active_prompt === 'watercolor' && "
                           "window.streamedit.server.prompt_switch_frames !== null", 60, "the new prompt")
            switch = page.evaluate("window.streamedit.server.prompt_switch_frames")
            assert switch <= 3, f"the prompt took {switch} frames to apply"
            wait_for(page, f"window.streamedit.server.sent > {sent_before + 3}", 60, "frames after the change")

            # The stats update: overlay numbers filled in, counters grow.
            wait_for(page, "document.getElementById('latency').textContent !== '–' && "
                           "document.getElementById('fps').textContent !== '–'", 30, "overlay numbers")
            first = page.evaluate("window.streamedit.server.sent")
            wait_for(page, f"window.streamedit.server.sent > {first}", 30, "the stats to move")
            stats = srv.get("/stats")["sessions"][0]
            assert stats["active_prompt"] == "watercolor" and stats["fps"] > 0 and stats["latency_ms_p50"] > 0
            page.click("summary")  # open the details panel for the artifact
            page.wait_for_timeout(1500)  # let the overlay show a couple of refreshes
            page.screenshot(path=str(ARTIFACTS / "serve.png"), full_page=True)
            overlay = page.inner_text("#overlay")
            print(f"\noverlay: {overlay!r}; server stats: {json.dumps(stats)}")

            page.click("#stop")
            deadline = time.monotonic() + 20
            while srv.get("/health")["sessions"] and time.monotonic() < deadline:
                time.sleep(0.2)
            assert srv.get("/health")["sessions"] == 0, "session not cleaned up after Stop"

            # A chosen video file instead of the camera.
            with page.expect_file_chooser() as chooser:
                page.select_option("#source", "file")
            chooser.value.set_files(str(write_webm(tmp_path / "clip.webm")))
            frames_before = page.evaluate("window.streamedit.outputFrames")
            page.click("#start")
            wait_for(page, f"window.streamedit.outputFrames >= {frames_before + 3} && window.streamedit.session", 120,
                     "stylized frames from the video file")
            assert srv.get("/stats")["sessions"][0]["input_size"] == [171, 128]  # scaled down to ~size by the page
            page.click("#stop")
            assert not errors, errors
        finally:
            browser.close()
            torch.set_num_threads(threads)


@pytest.mark.timeout(180)
def test_browser_token_and_busy_refusal(tmp_path, tiny_models):
    """The page needs the token when the server has one, sends it on its API calls, and shows the
    server's refusal when the session limit is reached."""
    from streamedit.serve.runtime import engine_factory
    from streamedit.serve.server import Server, ServerConfig

    clip = write_y4m(tmp_path / "clip.y4m", frames=10)
    server = Server(ServerConfig(ice_hosts=["127.0.0.1"], size=64, token="browser-test-token", max_sessions=1),
                    engine_factory(tiny_models))
    with ThreadedServer(server, free_port()) as srv, playwright_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, timeout=60_000,
                                    args=CHROMIUM_ARGS + [f"--use-file-for-fake-video-capture={clip}"])
        try:
            page = browser.new_page()
            resp = page.goto(f"http://127.0.0.1:{srv.port}/", timeout=30_000)
            assert resp.status == 401 and "Access token needed" in page.content()
            url = f"http://127.0.0.1:{srv.port}/?token=browser-test-token"
            page.goto(url, timeout=30_000)
            page.wait_for_function("document.getElementById('size').value === '64'", timeout=10_000)  # server default
            page.click("#start")
            wait_for(page, "window.streamedit.outputFrames >= 2", 90, "frames with the token")
            other = browser.new_page()
            other.goto(url, timeout=30_000)
            other.click("#start")
            wait_for(other, "window.streamedit.error !== ''", 30, "the refusal")
            assert "server busy: 1 of 1 sessions in use" in other.inner_text("#error")
            assert other.evaluate("window.streamedit.status") == "error"
            assert not other.is_disabled("#start")  # the page is ready to try again
        finally:
            browser.close()
