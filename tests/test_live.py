"""`streamedit live`: the capture -> engine -> sinks loop (keys, pause, save, live prompt), the
virtual-camera output (with a stand-in for pyvirtualcam) and the one-line messages for missing
backends and cameras."""

from __future__ import annotations

import queue
import sys
import types

import numpy as np
import pytest
from click.testing import CliRunner

from streamedit.errors import StreameditError
from streamedit.serve import live
from streamedit.serve.live import Grabber, LiveLoop, live_command, open_camera
from streamedit.video.clips import make_test_clip


class FakeEngine:
    def __init__(self, prompt="oil painting"):
        self.prompt = prompt

    def set_prompt(self, prompt):
        if len(prompt) > 40:  # as the shared engine's fast text encoder refuses a prompt over its room
            raise StreameditError("the prompt is too long for this engine")
        self.prompt = prompt

    def process(self, frames):
        return [255 - f for f in frames]


class ScriptedWindow:
    """Stands in for the OpenCV window: returns the scripted key at each shown frame."""

    def __init__(self, keys):
        self.keys, self.shown = list(keys), []

    def show(self, rgb_in, rgb_out, lines):
        self.shown.append((rgb_in.shape, rgb_out.shape, lines))
        return self.keys.pop(0) if self.keys else 255


class FakeCamera:
    instances = []

    def __init__(self, width, height, fps, device=None):
        self.width, self.height, self.frames, self.device = width, height, [], device or "/dev/video-fake"
        FakeCamera.instances.append(self)

    def send(self, frame):
        assert frame.shape == (self.height, self.width, 3) and frame.dtype == np.uint8
        self.frames.append(frame)

    def close(self):
        pass


@pytest.fixture()
def clip(tmp_path):
    return str(make_test_clip(tmp_path / "clip.mp4", frames=40, width=96, height=64, fps=24))


@pytest.fixture()
def fake_pyvirtualcam(monkeypatch):
    FakeCamera.instances.clear()
    monkeypatch.setitem(sys.modules, "pyvirtualcam", types.SimpleNamespace(Camera=FakeCamera))
    return FakeCamera


def test_loop_keys_pause_save_and_prompt(clip, tmp_path):
    none = 255
    keys = [none, none, ord("s"), ord(" "), none, none, ord(" "), none, ord("q")]
    window, engine, commands = ScriptedWindow(keys), FakeEngine(), queue.Queue()
    grabber = Grabber(open_camera(clip), pace_fps=30).start()
    messages = []
    loop = LiveLoop(grabber, engine, 64, window=window, save_dir=tmp_path / "shots", commands=commands,
                    echo=messages.append)
    commands.put(("prompt", "  watercolor  "))
    commands.put(("prompt", "bad\x00prompt"))
    commands.put(("prompt", "a prompt the engine refuses as too long for it"))
    try:
        loop.run()
    finally:
        grabber.stop()
    assert engine.prompt == "watercolor" and "prompt: watercolor" in messages
    assert any(m.startswith("prompt not changed") for m in messages)
    assert "prompt not changed: the prompt is too long for this engine" in messages and loop.prompt == "watercolor"
    assert len(loop.saved) == 1 and loop.saved[0].is_file()
    assert "paused" in messages and "resumed" in messages
    # frames shown while paused repeat the last output: fewer processed than shown
    assert loop.processed < len(window.shown) == len(keys)
    # the 96x64 clip at long side 64 keeps its aspect (short side rounded to 32), not squashed to 64x64
    assert window.shown[0][0] == (32, 64, 3) and "q quit" in window.shown[0][2][-1]


def test_loop_feeds_virtual_camera_and_stops_at_end_of_video(clip, fake_pyvirtualcam):
    cam = live.VirtualCamSink((32, 64), 24)  # the working (h, w) of the 96x64 clip at 64
    grabber = Grabber(open_camera(clip), pace_fps=400).start()
    loop = LiveLoop(grabber, FakeEngine(), (32, 64), vcam=cam, echo=lambda m: None)
    try:
        loop.run()  # ends by itself when the video ends
    finally:
        grabber.stop()
    assert loop.processed >= 1 and len(cam.cam.frames) == loop.processed
    cropped = LiveLoop(Grabber(open_camera(clip), pace_fps=400).start(), FakeEngine(), 64, crop=True, max_frames=1,
                       echo=lambda m: None)
    try:
        cropped.run()
    finally:
        cropped.grabber.stop()
    assert cropped.shape == (64, 64) and cropped._last[0].shape == (64, 64, 3)
    assert loop.processed + grabber.latest.dropped >= 30  # every frame was either processed or dropped


def test_terminal_commands(monkeypatch):
    import io

    monkeypatch.setattr(sys, "stdin", io.StringIO("watercolor\n/p\n\n/s\n/q\n"))
    commands = queue.Queue()
    live.stdin_commands(commands)
    assert [commands.get_nowait() for _ in range(5)] == [("prompt", "watercolor"), "pause", "save", "quit", "eof"]


def test_missing_outputs_and_backends_have_clear_messages(monkeypatch, clip):
    runner = CliRunner()
    result = runner.invoke(live_command, ["--camera", clip])
    assert result.exit_code == 2 and "--window and/or --virtual-cam" in result.output
    monkeypatch.delenv("DISPLAY", raising=False)
    monkeypatch.delenv("WAYLAND_DISPLAY", raising=False)
    if sys.platform.startswith("linux"):
        result = runner.invoke(live_command, ["--camera", clip, "--window"])
        assert isinstance(result.exception, StreameditError) and "DISPLAY" in str(result.exception)
    monkeypatch.setenv("DISPLAY", ":99")
    monkeypatch.setattr(live.cv2, "namedWindow", _headless_named_window)
    result = runner.invoke(live_command, ["--camera", clip, "--window"])
    assert isinstance(result.exception, StreameditError) and "GUI support" in str(result.exception)
    monkeypatch.setitem(sys.modules, "pyvirtualcam", None)  # not installed
    result = runner.invoke(live_command, ["--camera", clip, "--virtual-cam"])
    assert isinstance(result.exception, StreameditError) and "pip install pyvirtualcam" in str(result.exception)


def _headless_named_window(*args):
    raise live.cv2.error("The function is not implemented. Rebuild the library with Windows, GTK+ 2.x or Cocoa")


def test_no_virtual_camera_device_message(monkeypatch, clip):
    def no_device(*args, **kwargs):
        raise RuntimeError("'v4l2loopback' backend: No v4l2 loopback device found at /dev/video[0-99].")

    monkeypatch.setitem(sys.modules, "pyvirtualcam", types.SimpleNamespace(Camera=no_device))
    result = CliRunner().invoke(live_command, ["--camera", clip, "--virtual-cam"])
    msg = str(result.exception)
    assert isinstance(result.exception, StreameditError) and "no virtual camera available" in msg
    assert "modprobe v4l2loopback" in msg and "\n" not in msg


def test_missing_camera_message(fake_pyvirtualcam):
    result = CliRunner().invoke(live_command, ["--camera", "7", "--virtual-cam"])
    assert isinstance(result.exception, StreameditError)
    assert "camera 7 could not be opened" in str(result.exception)


@pytest.mark.timeout(180)
def test_cli_runs_tiny_model_into_virtual_camera(clip, fake_pyvirtualcam, tmp_path):
    result = CliRunner().invoke(live_command, ["--camera", clip, "--virtual-cam", "--model", "random:tiny",
                                               "--device", "cpu", "--size", "64", "--prompt", "oil painting"],
                                input="watercolor\n")
    assert result.exit_code == 0, result.output + repr(result.exception)
    cam = fake_pyvirtualcam.instances[-1]
    assert (cam.width, cam.height) == (64, 32) and len(cam.frames) >= 1  # the 96x64 clip's aspect, long side 64
    assert "prompt: watercolor" in result.output and "stopped after" in result.output
