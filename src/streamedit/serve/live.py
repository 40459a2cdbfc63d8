"""`streamedit live`: camera -> engine -> desktop window and/or virtual camera.

Keys in the window: ``q`` quit, ``space`` pause/resume, ``s`` save the current frame. In the terminal,
type a new prompt and press Enter to change it live (``/q``, ``/p``, ``/s`` do the same as the keys).
A grabber thread keeps only the newest camera frame, so a slow model drops frames instead of lagging.
"""

from __future__ import annotations

import os
import queue
import sys
import threading
import time
from collections import deque
from pathlib import Path

import click
import cv2
import numpy as np

from ..config import check_prompt
from ..errors import StreameditError
from ..video.geometry import fit, working_shape
from .runtime import engine_choice_options, live_model_options
from .session import LatestQueue

WINDOW = "streamedit live"
VCAM_HINT = ("Linux: 'sudo modprobe v4l2loopback devices=1'; Windows/macOS: install OBS Studio and start its "
             "Virtual Camera once")


class Grabber:
    """Reads the capture in a thread; the newest frame wins (older ones are counted as dropped)."""

    def __init__(self, capture, pace_fps: float | None = None):
        self.capture, self.pace = capture, pace_fps
        self.latest = LatestQueue(1)
        self.ended = False
        self._thread = threading.Thread(target=self._run, name="streamedit-grabber", daemon=True)

    def start(self) -> "Grabber":
        self._thread.start()
        return self

    def _run(self) -> None:
        period = 1.0 / self.pace if self.pace else 0.0
        next_t = time.monotonic()
        while not self.latest.closed:
            ok, bgr = self.capture.read()
            if not ok:
                self.ended = True
                self.latest.put(None)
                return
            self.latest.put(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB))
            if period:
                next_t += period
                time.sleep(max(0.0, next_t - time.monotonic()))

    def get(self, timeout: float = 1.0):
        items = self.latest.get_batch(1, timeout)
        return items[0] if items else None

    def stop(self) -> None:
        self.latest.close()
        self._thread.join(2)


class WindowSink:
    def __init__(self, shape: tuple[int, int]):
        """``shape``: the working (h, w); input and output are shown side by side."""
        if sys.platform.startswith("linux") and not (os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")):
            raise StreameditError("--window needs a desktop session (no DISPLAY is set); use --virtual-cam")
        try:
            cv2.namedWindow(WINDOW, cv2.WINDOW_NORMAL)
        except cv2.error:
            raise StreameditError("--window needs OpenCV with GUI support, and this is a headless build: "
                                  "pip uninstall opencv-python-headless && pip install opencv-python") from None
        cv2.resizeWindow(WINDOW, 2 * shape[1], shape[0])

    def show(self, rgb_in: np.ndarray, rgb_out: np.ndarray, lines: list[str]) -> int:
        view = cv2.cvtColor(np.hstack([rgb_in, rgb_out]), cv2.COLOR_RGB2BGR)
        for i, text in enumerate(lines):
            y = 18 + 18 * i
            cv2.putText(view, text, (8, y), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (0, 0, 0), 3, cv2.LINE_AA)
            cv2.putText(view, text, (8, y), cv2.FONT_HERSHEY_SIMPLEX, 0.45, (80, 200, 255), 1, cv2.LINE_AA)
        cv2.imshow(WINDOW, view)
        return cv2.waitKey(1) & 0xFF

    def close(self) -> None:
        cv2.destroyWindow(WINDOW)


class VirtualCamSink:
    def __init__(self, shape: tuple[int, int], fps: float, device: str | None = None):
        try:
            import pyvirtualcam
        except ImportError:
            raise StreameditError("--virtual-cam needs pyvirtualcam: pip install pyvirtualcam") from None
        try:
            self.cam = pyvirtualcam.Camera(width=shape[1], height=shape[0], fps=fps, device=device)
        except RuntimeError as exc:
            first = (str(exc).strip().splitlines() or ["no backend"])[0]
            raise StreameditError(f"no virtual camera available ({first}); {VCAM_HINT}") from None
        self.device = self.cam.device

    def send(self, rgb: np.ndarray) -> None:
        self.cam.send(np.ascontiguousarray(rgb))

    def close(self) -> None:
        self.cam.close()


def open_camera(camera: str):
    """``camera`` is an index ("0") or a video file / URL (handy for trying it out without a camera)."""
    cap = cv2.VideoCapture(int(camera)) if camera.isdigit() else cv2.VideoCapture(camera)
    if not cap.isOpened():
        what = f"camera {camera}" if camera.isdigit() else f"video {camera!r}"
        raise StreameditError(f"{what} could not be opened (missing, or in use by another program?)")
    if camera.isdigit():
        cap.set(cv2.CAP_PROP_FRAME_WIDTH, 640)
        cap.set(cv2.CAP_PROP_FRAME_HEIGHT, 480)
        cap.set(cv2.CAP_PROP_BUFFERSIZE, 1)
    return cap


def stdin_commands(commands: queue.Queue) -> None:
    """Terminal input: a line is a new prompt; /q, /p, /s are quit, pause, save."""
    aliases = {"/q": "quit", "/quit": "quit", "/p": "pause", "/pause": "pause", "/s": "save", "/save": "save"}
    for line in sys.stdin:
        line = line.strip()
        if line:
            commands.put(aliases.get(line.lower(), ("prompt", line)))
    commands.put("eof")


class LiveLoop:
    """The capture -> engine -> sinks loop, separate from click so it can be driven in tests."""

    def __init__(self, grabber: Grabber, engine, size: int | tuple[int, int], *, window=None, vcam=None,
                 save_dir: Path = Path("."), commands: queue.Queue | None = None, max_frames: int | None = None,
                 echo=print, crop: bool = False):
        """``size``: the working (h, w), or the long side (the first frame's aspect decides); ``crop``: centre
        square frames."""
        self.grabber, self.engine, self.crop = grabber, engine, crop
        self.size, self.shape = (size, None) if isinstance(size, int) else (max(size), tuple(size))
        self.window, self.vcam, self.save_dir = window, vcam, Path(save_dir)
        self.commands = commands or queue.Queue()
        self.max_frames, self.echo = max_frames, echo
        self.paused, self.processed, self.saved = False, 0, []
        self.prompt = getattr(engine, "prompt", None) or ""
        self._times: deque = deque(maxlen=30)
        self._last: tuple[np.ndarray, np.ndarray] | None = None

    def handle(self, command) -> bool:
        """Apply one command; False means quit."""
        if command == "quit":
            return False
        if command == "pause":
            self.paused = not self.paused
            self.echo("paused" if self.paused else "resumed")
        elif command == "save" and self._last is not None:
            self.save_dir.mkdir(parents=True, exist_ok=True)
            path = self.save_dir / f"streamedit-{time.strftime('%Y%m%d-%H%M%S')}-{len(self.saved):03d}.png"
            cv2.imwrite(str(path), cv2.cvtColor(self._last[1], cv2.COLOR_RGB2BGR))
            self.saved.append(path)
            self.echo(f"saved {path}")
        elif isinstance(command, tuple) and command[0] == "prompt":
            try:
                prompt = check_prompt(command[1])
                self.engine.set_prompt(prompt)  # the shared engine refuses one its text encoder cannot take
            except (ValueError, StreameditError) as exc:
                self.echo(f"prompt not changed: {exc}")
            else:
                self.prompt = prompt
                self.echo(f"prompt: {self.prompt}")
        return True

    def step(self) -> bool:
        while not self.commands.empty():
            if not self.handle(self.commands.get_nowait()):
                return False
        frame = self.grabber.get(timeout=0.05 if self.paused else 1.0)
        if frame is None and self.grabber.ended:
            return False
        if frame is not None and not self.paused:
            if self.shape is None:
                self.shape = working_shape(*frame.shape[:2], self.size, crop=self.crop)
            rgb_in = fit(frame, self.shape, self.crop)
            rgb_out = self.engine.process([rgb_in])[0]
            self._last = (rgb_in, rgb_out)
            self.processed += 1
            self._times.append(time.monotonic())
            if self.vcam is not None:
                self.vcam.send(rgb_out)
        if self.window is not None and self._last is not None:
            fps = (len(self._times) - 1) / max(self._times[-1] - self._times[0], 1e-6) if len(self._times) > 1 else 0
            lines = [f"{fps:.1f} fps  dropped {self.grabber.latest.dropped}" + ("  PAUSED" if self.paused else ""),
                     self.prompt[:60], "q quit  space pause  s save"]
            key = self.window.show(*self._last, lines)
            keymap = {ord("q"): "quit", 27: "quit", ord(" "): "pause", ord("s"): "save"}
            if key in keymap and not self.handle(keymap[key]):
                return False
        return self.max_frames is None or self.processed < self.max_frames

    def run(self) -> None:
        while self.step():
            pass


@click.command("live")
@click.option("--camera", default="0", show_default=True, help="Camera index (or a video file to try it without one).")
@click.option("--window", is_flag=True, help="Show input and output side by side in a desktop window.")
@click.option("--virtual-cam", is_flag=True, help="Send the output to a virtual camera (OBS, video calls).")
@click.option("--vcam-device", default=None, help="Virtual camera device (e.g. /dev/video10); default: the first.")
@live_model_options
@click.option("--prompt", default="oil painting", show_default=True)
@click.option("--size", default=512, show_default=True, type=int,
              help="Working size: the long side (the camera's aspect is kept, short side rounded to 32).")
@click.option("--crop", is_flag=True, help="Centre-crop frames to a square (size x size) instead.")
@click.option("--fps", default=30.0, show_default=True, help="Frame rate announced to the virtual camera.")
@click.option("--save-dir", default=".", show_default=True, type=click.Path(file_okay=False),
              help="Where 's' saves frames.")
@engine_choice_options
def live_command(camera, window, virtual_cam, vcam_device, model, revision, device, dtype, lllite, steps, te_size,
                 prompt, size, crop, fps, save_dir, shared_engine, preset):
    """Stylize a camera live into a window and/or a virtual camera (type a prompt + Enter to change it)."""
    if not (window or virtual_cam):
        raise click.UsageError("choose an output: --window and/or --virtual-cam")
    if size < 64 or size % 32:
        raise click.UsageError(f"--size must be a multiple of 32 and at least 64, got {size}")
    try:
        prompt = check_prompt(prompt)
    except ValueError as exc:
        raise click.UsageError(f"--prompt: {exc}") from None
    # Everything that can be missing is checked before the model loads.
    from .runtime import check_lllite, load_runtime
    from .shared import choose_engine

    check_lllite(lllite)
    if shared_engine is False:
        choose_engine(False, shared_engine, preset)  # a contradiction is reported before anything opens
    cap = open_camera(camera)
    # the working size from the camera's reported frame size (sinks need it before the first frame)
    cam_h, cam_w = int(cap.get(cv2.CAP_PROP_FRAME_HEIGHT)), int(cap.get(cv2.CAP_PROP_FRAME_WIDTH))
    if not (cam_h and cam_w):  # not reported: the first frame decides
        ok, first = cap.read()
        cam_h, cam_w = first.shape[:2] if ok else (0, 0)
    shape = working_shape(cam_h or size, cam_w or size, size, crop=crop)
    try:
        win = WindowSink(shape) if window else None
        cam = VirtualCamSink(shape, fps, vcam_device) if virtual_cam else None
    except BaseException:
        cap.release()
        raise
    click.echo(f"loading {model} ...", err=True)
    try:
        engine = _live_engine(load_runtime(model, device, dtype, revision), shared_engine, preset, prompt, size,
                              shape, steps, lllite, te_size)
    except BaseException:
        cap.release()
        raise
    pace = None if camera.isdigit() else (cap.get(cv2.CAP_PROP_FPS) or 30.0)
    grabber = Grabber(cap, pace).start()
    commands: queue.Queue = queue.Queue()
    threading.Thread(target=stdin_commands, args=(commands,), daemon=True).start()
    if cam is not None:
        click.echo(f"virtual camera: {cam.device}", err=True)
    click.echo("running: type a prompt + Enter to change it; /q quit, /p pause, /s save"
               + (" (window keys: q, space, s)" if win else ""), err=True)
    loop = LiveLoop(grabber, engine, shape, window=win, vcam=cam, save_dir=Path(save_dir), commands=commands,
                    echo=lambda m: click.echo(m, err=True), crop=crop)
    try:
        loop.run()
    except KeyboardInterrupt:
        pass
    finally:
        grabber.stop()
        cap.release()
        engine.close()
        if getattr(engine, "shared", None) is not None:
            engine.shared.close()
        for sink in (win, cam):
            if sink is not None:
                sink.close()
    click.echo(f"stopped after {loop.processed} frames ({grabber.latest.dropped} dropped)", err=True)


def _live_engine(models, shared_engine, preset, prompt, size, shape, steps, lllite, te_size):
    """One stream of a multi-stream engine (batch 1; on CUDA compiled and its graphs captured now, for the
    camera's working ``shape``), or with --no-shared-engine the eager per-session engine."""
    from click.core import ParameterSource

    from .runtime import LiveEngine
    from .shared import SharedEngine, SharedStream, choose_engine, describe_prepared

    choice = choose_engine(models.device.type == "cuda", shared_engine, preset)
    click.echo(f"engine: preset {choice.preset} ({choice.why})", err=True)
    if not choice.shared:
        return LiveEngine(models, prompt, size, steps=steps, lllite=lllite, te_size=te_size)
    given = click.get_current_context().get_parameter_source("te_size") is ParameterSource.COMMANDLINE
    shared = SharedEngine(models, size, steps=steps, lllite=lllite, te_size=te_size if given else None,
                          max_streams=1, batch_size=1, preset=choice.preset, prompt=prompt)
    try:
        for done in shared.prepare([shape], size):
            click.echo(describe_prepared(done, shared.engine.buckets), err=True)
        shared.start()
        return SharedStream(shared, prompt, size)
    except BaseException:
        shared.close()
        raise
