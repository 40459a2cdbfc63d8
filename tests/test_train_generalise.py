"""train lllite's generalisation options (issue 29) on random:tiny: stale cond exactly as the runtime makes it,
pair augmentation, the flow convention, synthetic training clips."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner

from streamedit.cli.group import cli
from streamedit.models.loading import load_models
from streamedit.temporal.adapter import LLLiteAdapter
from streamedit.temporal.conditioner import TemporalConditioner
from streamedit.train.augment import PairViews, StaleCond, augment, random_transforms
from streamedit.train.lllite import load_pairs, train_lllite
from streamedit.train.pairs import make_pairs
from streamedit.video.synthetic import write_synthetic_clips

SIZE, FRAMES, CUT, B = 64, 16, 10, 4
TINY_CPU = ["--model", "random:tiny", "--device", "cpu"]


@pytest.fixture(scope="module")
def models():
    return load_models("random:tiny", device="cpu", dtype=torch.float32)


@pytest.fixture(scope="module")
def pairs(models, tmp_path_factory):
    clips = write_synthetic_clips(tmp_path_factory.mktemp("clips"), [3], frames=FRAMES, size=SIZE, cut_at=CUT)
    out = tmp_path_factory.mktemp("pairs")
    make_pairs(models, clips, ["oil painting"], out, size=SIZE, alpha=0.5, batch_size=4, progress=False)
    return out


def runtime_conds(frames: np.ndarray, outputs: np.ndarray, refresh: int):
    """The cond image each frame gets in the engine (TemporalConditioner, batches of B, cut refresh on), and
    the age of its batch's last refresh: what StaleCond must reproduce."""
    class Stub:
        config = SimpleNamespace(flow="backward")

        def set_cond_image(self, cond):
            self.cond = cond.clone()

    stub, conds, ages, last = Stub(), [], [], 0
    tc = TemporalConditioner(stub, refresh_every=refresh, cut_refresh=True)
    for b, k in enumerate(range(0, len(frames), B)):
        chunk = list(frames[k:k + B])
        plan = tc.plan(chunk, len(chunk))
        tc.apply(plan, torch.from_numpy(np.stack(chunk)), {})
        last = b if plan.refresh else last
        conds += [stub.cond[j].permute(1, 2, 0).numpy() for j in range(len(chunk))]
        ages += [b - last] * len(chunk)
        tc.remember(torch.from_numpy(outputs[k:k + B]), len(chunk))
    tc.close()
    return conds, ages


@pytest.mark.parametrize("refresh", [1, 3, 8])
def test_stale_cond_is_the_runtime_cond(pairs, refresh):
    data = load_pairs(pairs)
    assert data.start.nonzero().flatten().tolist() == [0, CUT]  # the cut, found as the runtime finds it
    assert CUT % B  # in the middle of a batch: the next batch refreshes too
    stale = StaleCond(data, refresh_max=8, runtime_batch=B)
    conds, ages = runtime_conds(data.source.numpy(), data.teacher.numpy(), refresh)
    for t, (want, age) in enumerate(zip(conds, ages)):
        assert age <= stale.max_age(t, t % B), (t, age)  # a state the mimic draws
        got = stale.cond_for(t, age, t % B)
        assert np.array_equal(got, want), (t, age)
    if refresh > 1:  # reused batches really carry an older frame's cond
        assert max(ages) >= 1
    stale.close()


def test_fresh_stale_cond_is_the_stored_cond(pairs):
    data = load_pairs(pairs)
    stale = StaleCond(data, refresh_max=1)
    for t in range(FRAMES):
        assert np.array_equal(stale.cond_for(t, 0, 0), data.cond[t].numpy()), t
    stale.close()


def test_training_batches_carry_stale_conds(models, pairs):
    from streamedit.diffusion.denoiser import Denoiser

    data = load_pairs(pairs)
    stale = StaleCond(data, refresh_max=8, runtime_batch=B)
    views = PairViews(Denoiser(models, 1, SIZE), data, pixel=False, stale=stale)
    idx = torch.arange(FRAMES)
    cond = views(idx, torch.Generator().manual_seed(5))[0]
    ages, slots = stale.draw(idx, torch.Generator().manual_seed(5))
    want = np.stack([stale.cond_for(t, a, j) for t, a, j in zip(range(FRAMES), ages, slots)])
    assert torch.equal(cond, torch.from_numpy(want).permute(0, 3, 1, 2))
    old = [t for t, a, j in zip(range(FRAMES), ages, slots) if (a or j) and t - B * a - j - 1 >= stale.shot_start[t]]
    assert old, "no example drew an older cond"
    assert any(not torch.equal(cond[t], data.cond[t].permute(2, 0, 1)) for t in old)
    assert all(t - B * a >= stale.shot_start[t] for t, a in zip(range(FRAMES), ages))
    stale.close()


def test_augmentation_stays_in_frame_and_is_shared():
    theta = random_transforms(256, torch.Generator().manual_seed(0), zoom_min=0.5, rotate=20)
    grid = F.affine_grid(theta, (256, 3, 32, 32), align_corners=False)
    assert grid.abs().max() <= 1.0 + 1e-5  # never samples the padding
    assert (theta[:, 0, 0] < 0).any() and (theta[:, 0, 0] > 0).any()  # flips both ways
    x = torch.randint(0, 256, (4, 32, 32, 3), dtype=torch.uint8)
    same = random_transforms(4, torch.Generator(), zoom_min=1.0, rotate=0, flip=False)
    assert torch.equal(augment([x], same)[0], x)  # the identity is exact
    a, b = augment([x, x.clone()], theta[:4])
    assert torch.equal(a, b) and not torch.equal(a, x)


def test_train_with_stale_cond_augment_and_forward_flow(models, pairs, tmp_path):
    out = tmp_path / "a.safetensors"
    s = train_lllite(models, pairs, out, steps=2, batch_size=3, p_one=1.0, pixel_weight=10, stale_cond=8,
                     augment=True, flow="forward", progress=False)
    assert np.isfinite(s["final_loss"])
    assert LLLiteAdapter.load(out, models.unet).config.flow == "forward"


def _invoke(*args):
    r = CliRunner().invoke(cli, list(map(str, args)))
    return r.exit_code, r.stdout, r.stderr


@pytest.mark.parametrize("args, msg", [
    (["train", "lllite", "--flow", "forward"], "--stale-cond"),
    (["train", "lllite", "--stale-cond", "-1"], "--stale-cond"),
    (["train", "lllite", "--augment", "--zoom-min", "0"], "--zoom-min"),
    (["train", "pairs", "-p", "x", "--synthetic", "2", "--synthetic-seed", "8999"], "reserved"),
    (["train", "pairs", "-p", "x"], "--synthetic"),
])
def test_cli_bad_inputs(pairs, tmp_path, args, msg):
    extra = ["--pairs", pairs] if args[1] == "lllite" else []
    code, _, err = _invoke(*args, *TINY_CPU, *extra, "-o", tmp_path / "o")
    assert code == 2 and len(err.strip().splitlines()) == 1 and msg in err, err


def test_cli_synthetic_pairs(tmp_path):
    out = tmp_path / "p"
    code, stdout, err = _invoke("train", "pairs", *TINY_CPU, "--synthetic", 2, "--synthetic-frames", 4, "-p",
                                "oil painting", "-o", out, "--size", SIZE, "--batch", 2)
    assert code == 0, err
    assert "8 pairs from 2 clip(s)" in stdout
    assert sorted(p.name for p in (out / "synthetic").iterdir()) == ["synth-00000.mp4", "synth-00001.mp4"]
