"""`stylize --ray`: shards on a local Ray cluster (CPU tasks) against one process running the whole file."""

import os
import signal
import subprocess
import sys
import time

import av
import numpy as np
import pytest
from click.testing import CliRunner

from streamedit.cli.group import cli
from streamedit.scale.shards import plan
from streamedit.video.clips import make_test_clip

FAST = ["-p", "oil painting", "--model", "random:tiny", "--size", "64", "--batch", "4", "--device", "cpu"]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """One local Ray cluster for the module (2 CPUs). Its workers inherit the failure hook: the first try of
    shard 1 of the first job run here crashes its worker, once."""
    ray = pytest.importorskip("ray")
    marker = tmp_path_factory.mktemp("ray") / "shard-crashed"
    os.environ["STREAMEDIT_TEST_FAIL_SHARD"] = f"0:1:{marker}"
    try:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    finally:
        del os.environ["STREAMEDIT_TEST_FAIL_SHARD"]
    yield ray.get_runtime_context().gcs_address, marker
    ray.shutdown()


def _run(*args):
    result = CliRunner().invoke(cli, [str(a) for a in args])
    return result.exit_code, result.stdout, result.stderr


def _decode(path):
    """(pts list, RGB frames, audio samples, video time base) of a file."""
    with av.open(str(path)) as c:
        v = c.streams.video[0]
        pts, frames = [], []
        for f in c.decode(v):
            pts.append(f.pts)
            frames.append(f.to_ndarray(format="rgb24"))
        tb = v.time_base
    with av.open(str(path)) as c:
        samples = sum(f.samples for f in c.decode(audio=0)) if c.streams.audio else 0
    return [p * tb for p in pts], frames, samples


def test_plan_covers_every_frame_in_whole_batches():
    shards = plan(0, 30, batch=4, shard_frames=7, warmup=5)
    assert [(s.start, s.end, s.warm) for s in shards] == [(0, 8, 0), (8, 16, 8), (16, 24, 8), (24, 30, 8)]


def test_sharded_equals_one_process_frame_for_frame(tmp_path, cluster):
    """No adapter: lossless output (--crf 0) so any pixel the shards got wrong shows; shard 1's first try
    crashes its worker and Ray runs it again."""
    address, marker = cluster
    src = make_test_clip(tmp_path / "in.mp4", frames=20, width=64, height=48, audio=True)
    # the one process is a fresh one with one torch thread, as each Ray worker is: not this test process,
    # whose floating-point state earlier tests may have changed
    one = subprocess.run([sys.executable, "-m", "streamedit.cli", "stylize", str(src), "-o", str(tmp_path / "one.mp4"),
                          *FAST, "--crf", "0"], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert one.returncode == 0, one.stderr
    code, _, err = _run("stylize", src, "-o", tmp_path / "ray.mp4", *FAST, "--crf", "0", "--ray", address,
                        "--shard-frames", "8")
    assert code == 0, err
    assert "3 shards of 1 input(s)" in err and marker.exists()  # the crashed try happened, and was retried
    pts1, frames1, audio1 = _decode(tmp_path / "one.mp4")
    pts2, frames2, audio2 = _decode(tmp_path / "ray.mp4")
    assert len(frames1) == len(frames2) == 20 and pts1 == pts2 and audio1 == audio2 > 0
    for i, (a, b) in enumerate(zip(frames1, frames2)):
        diff = np.abs(a.astype(int) - b.astype(int))
        assert not diff.any(), f"frame {i} differs: {np.count_nonzero(diff)} values, up to {diff.max()} levels"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.mp4", "one.mp4", "ray.mp4"]  # shard folder gone


def test_adapter_and_many_files_keep_frame_count_and_timestamps(tmp_path, cluster):
    address, _ = cluster
    a = make_test_clip(tmp_path / "a.mp4", frames=14, width=64, height=48, audio=True)
    b = make_test_clip(tmp_path / "b.mkv", frames=9, width=48, height=64, fps=25, pattern="cut")
    out = tmp_path / "out"
    out.mkdir()
    code, _, err = _run("stylize", a, b, "-o", out, *FAST, "--lllite", "random", "--hooks", "down",
                        "--ray", address, "--shard-frames", "4")
    assert code == 0, err
    assert "7 shards of 2 input(s)" in err  # 14 frames: 4 shards, 9 frames: 3
    for src, res in ((a, out / "a.mp4"), (b, out / "b.mkv")):
        pts_in, frames_in, audio_in = _decode(src)
        pts_out, frames_out, audio_out = _decode(res)
        assert pts_out == pts_in and len(frames_out) == len(frames_in)
        assert audio_out == audio_in
        assert frames_out[0].shape == frames_in[0].shape


def test_interrupt_keeps_finished_shards_and_a_playable_prefix(tmp_path, cluster):
    address, _ = cluster
    src = make_test_clip(tmp_path / "in.mp4", frames=48, width=64, height=48, audio=True)
    out, folder = tmp_path / "o.mp4", tmp_path / ".o.mp4.shards"
    cmd = [sys.executable, "-m", "streamedit.cli", "stylize", str(src), "-o", str(out), *FAST, "--steps", "2",
           "--ray", address, "--shard-frames", "4"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 150
    while time.time() < deadline and not (folder / "00000.mp4").exists():
        time.sleep(0.2)
    assert proc.poll() is None, proc.communicate()[1]
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "run the same command to finish" in err
    kept = sorted(p.name for p in folder.glob("0*.mp4"))
    assert 0 < len(kept) < 12
    pts, frames, audio = _decode(out)  # playable: the finished shards from the start
    prefix = next(i for i in range(13) if f"{i:05d}.mp4" not in kept)
    assert len(frames) == 4 * prefix and audio > 0
    pts_in = _decode(src)[0]
    assert pts == pts_in[:len(frames)]
    # the same command again runs only the missing shards and finishes the file
    code, _, err = _run(*cmd[3:])
    assert code == 0, err
    assert f"{len(kept)} frames reused" not in err and f"{4 * len(kept)} frames reused" in err
    assert _decode(out)[0] == pts_in and not folder.exists()


@pytest.mark.parametrize("command", ["stylize", "serve"])
def test_ray_missing_is_one_line_and_exit_2(tmp_path, command):
    src = make_test_clip(tmp_path / "in.mp4", frames=2, width=32, height=32)
    probe = ("import sys; sys.modules['ray'] = None\n"
             "from streamedit.cli.group import main; sys.argv[0] = 'streamedit'; main()")
    args = ([str(src), "-o", str(tmp_path / "o.mp4"), *FAST] if command == "stylize" else
            ["--model", "random:tiny", "--device", "cpu"])
    res = subprocess.run([sys.executable, "-c", probe, command, *args, "--ray", "auto"], capture_output=True,
                         text=True, timeout=300, check=False)
    assert res.returncode == 2 and res.stderr.strip() == "error: --ray needs Ray: pip install 'streamedit[ray]'"
