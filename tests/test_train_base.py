"""`streamedit train base` on CPU at toy sizes: data, filters, the saved folder, and the model it loads."""

import json
import logging
import shutil

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from streamedit.cli.group import cli
from streamedit.config import EngineConfig
from streamedit.engine.stream import StreamEngine
from streamedit.eval.metrics import psnr_per_frame
from streamedit.models.loading import load_models
from streamedit.train.base import BaseTrainConfig, train_base
from streamedit.train.data import build_examples, split_clips
from streamedit.train.filters import STYLES, apply_style
from streamedit.video.clips import make_test_clip


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("clips")
    for i, name in enumerate(("train_a", "held")):
        make_test_clip(root / f"{name}.mp4", frames=6, width=96, height=80, seed=i)
    return root


def test_filters_are_deterministic_and_distinct():
    rng = np.random.default_rng(0)
    frame = (rng.random((64, 64, 3)) * 255).astype(np.uint8)
    outs = {name: apply_style(name, frame) for name in STYLES}
    for name, out in outs.items():
        assert out.shape == frame.shape and out.dtype == np.uint8
        assert np.array_equal(out, apply_style(name, frame))
    names = list(outs)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            assert not np.array_equal(outs[a], outs[b])
    sketch = outs["pencil sketch"]
    assert np.array_equal(sketch[..., 0], sketch[..., 2])  # gray


def test_split_and_examples(clip_dir):
    train, held = split_clips(clip_dir, ["held"])
    assert [p.stem for p in train] == ["train_a"] and [p.stem for p in held] == ["held"]
    with pytest.raises(Exception, match="not in"):
        split_clips(clip_dir, ["nope"])
    sources, targets = build_examples(train, 32, 2, seed=0, workers=1)
    assert sources.shape == (12, 32, 32, 3) and targets.shape == (12, len(STYLES), 32, 32, 3)
    for k, name in enumerate(STYLES):  # a target is exactly the filter of its (augmented) source
        assert np.array_equal(targets[3, k], apply_style(name, sources[3]))


TINY = dict(size=64, crops_per_frame=1, vae_steps=4, vae_batch=2, unet_steps=6, unet_batch=4, pixel_batch=2,
            decoder_steps=3, workers=1)


@pytest.fixture(scope="module")
def trained(clip_dir, tmp_path_factory):
    cfg = BaseTrainConfig(**TINY)
    out = tmp_path_factory.mktemp("trained") / "demo"
    return cfg, out, train_base(str(clip_dir), str(out), ["held"], cfg, "cpu", progress=False)


def test_train_base_saves_a_loadable_demo_folder(trained, caplog):
    cfg, out, report = trained
    meta = json.loads((out / "streamedit.json").read_text())
    assert (out / "unet").is_dir() and meta["instructions"] == list(STYLES) and meta["strength"] == cfg.strength
    assert set(report["validation"]) >= set(STYLES) | {"vae_roundtrip_psnr", "mean_psnr"}
    for phase in ("unet", "decoder"):
        losses = [r["loss"] for r in report["log"] if r["phase"] == phase]
        assert losses and all(np.isfinite(losses))
    assert set(report["validation_before_decoder_tune"]) == set(report["validation"])
    models = load_models(str(out))
    assert models.vae.config.latent_channels == 8
    assert models.vae.config.scaling_factor == pytest.approx(report["scaling_factor"], rel=1e-3)
    # the validation PSNR was measured with the same engine path the saved folder runs through
    frames = [np.full((64, 64, 3), 90, np.uint8)] * 2
    with caplog.at_level(logging.WARNING):
        engine = StreamEngine(models, EngineConfig(prompt="starry night", batch_size=2, size=64, pipeline=False))
    assert "trained on these instructions only" in caplog.text
    assert len(list(engine.run(frames))) == 2
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        engine.set_prompt("Oil Painting")
    assert "trained on these instructions only" not in caplog.text


def test_train_base_continues_from_a_saved_model(trained, clip_dir, tmp_path):
    _, first, _ = trained
    out = tmp_path / "more"
    args = ["train", "base", "--clips", str(clip_dir), "--holdout", "held", "-o", str(out), "--device", "cpu",
            "--size", "64", "--crops", "1", "--unet-steps", "5", "--batch", "4", "--decoder-steps", "0", "--seed", "1"]
    result = CliRunner().invoke(cli, [*args, "--init-from", str(first)])
    assert result.exit_code == 0, result.output
    report = json.loads((out / "train_report.json").read_text())
    assert report["config"]["init_from"] == str(first) and "vae" not in {r["phase"] for r in report["log"]}
    before, after = load_models(str(first)), load_models(str(out))
    # the VAE (no VAE stage, no decoder tuning here), its scale and the TE are carried over exactly ...
    for name in ("vae", "text_encoder"):
        a, b = getattr(before, name).state_dict(), getattr(after, name).state_dict()
        assert all(torch.equal(a[k], b[k]) for k in a), name
    assert after.vae.config.scaling_factor == before.vae.config.scaling_factor
    assert json.loads((out / "streamedit.json").read_text())["strength"] == before.extras["strength"]
    # ... and the U-Net trained on from the saved weights
    a, b = before.unet.state_dict(), after.unet.state_dict()
    assert any(not torch.equal(a[k], b[k]) for k in a)
    drift = max((a[k].float() - b[k].float()).abs().max().item() for k in a)
    assert drift < 0.05  # a few small steps from the saved weights, not a new random U-Net
    for name in ("unet", "vae"):  # the folder it was continued from is not written into the new one
        assert "_name_or_path" not in json.loads((out / name / "config.json").read_text()), name
    bad = CliRunner().invoke(cli, [*args, "--init-from", str(clip_dir)])
    assert bad.exit_code != 0 and "not a model saved by" in bad.output
    other = tmp_path / "other"
    shutil.copytree(first, other)
    meta = json.loads((other / "streamedit.json").read_text())
    (other / "streamedit.json").write_text(json.dumps({**meta, "instructions": ["ukiyo-e"]}))
    bad = CliRunner().invoke(cli, [*args, "--init-from", str(other), "--strength", "0.1"])
    assert bad.exit_code == 2 and "other instructions" in bad.output and "Traceback" not in bad.output


def test_train_base_new_unet_architecture_on_a_kept_vae(trained, clip_dir, tmp_path):
    """--unet-* with --init-from: a fresh U-Net of that shape, trained on the saved model's VAE and TE;
    the folder records the shape, so the runtime loads and runs it like any other."""
    _, first, _ = trained
    out = tmp_path / "wide"

    def train_args(output, init_from):
        return ["train", "base", "--clips", str(clip_dir), "--holdout", "held", "-o", str(output), "--device", "cpu",
                "--size", "64", "--crops", "1", "--unet-steps", "3", "--batch", "4", "--decoder-steps", "0",
                "--init-from", str(init_from)]

    args = train_args(out, first)
    result = CliRunner().invoke(cli, [*args, "--unet-channels", "64,160,256", "--unet-heads", "1,2,4",
                                      "--unet-layers", "1,2,2"])
    assert result.exit_code == 0, result.output
    before, after = load_models(str(first)), load_models(str(out))
    assert tuple(after.unet.config.block_out_channels) == (64, 160, 256)
    assert tuple(after.unet.config.attention_head_dim) == (1, 2, 4)
    assert tuple(after.unet.config.transformer_layers_per_block) == (1, 2, 2)
    assert sum(p.numel() for p in after.unet.parameters()) > sum(p.numel() for p in before.unet.parameters())
    for name in ("vae", "text_encoder"):
        a, b = getattr(before, name).state_dict(), getattr(after, name).state_dict()
        assert all(torch.equal(a[k], b[k]) for k in a), name
    engine = StreamEngine(after, EngineConfig(prompt="cartoon", batch_size=2, size=64, pipeline=False))
    assert [f.shape for f in engine.run([np.full((64, 64, 3), 90, np.uint8)] * 2)] == [(64, 64, 3)] * 2
    # options not given keep the --init-from model's own values, not the demo's
    deeper = tmp_path / "deeper"
    result = CliRunner().invoke(cli, [*train_args(deeper, out), "--unet-layers", "1,1,1"])
    assert result.exit_code == 0, result.output
    config = load_models(str(deeper)).unet.config
    assert tuple(config.block_out_channels) == (64, 160, 256) and tuple(config.transformer_layers_per_block) == (1, 1, 1)
    for opt, value, message in (("--unet-channels", "64,160", "need 3 values"),
                                ("--unet-channels", "64,160,250", "multiple of 32"),
                                ("--unet-heads", "1,x,2", "positive integers")):
        bad = CliRunner().invoke(cli, [*args, opt, value])
        assert bad.exit_code != 0 and message in bad.output and "Traceback" not in bad.output, bad.output


def test_train_base_new_decoder_on_a_kept_encoder(trained, clip_dir, tmp_path):
    """--decoder-* with --init-from: a new decoder of that shape, fitted to the saved U-Net's outputs on the
    saved encoder's latents (encoder, scale, U-Net and TE unchanged), better than the same decoder untrained."""
    from streamedit.train.base import validate
    from streamedit.train.data import validation_frames, with_targets
    from streamedit.train.vae import new_decoder

    _, first, _ = trained
    out = tmp_path / "dec"
    args = ["train", "base", "--clips", str(clip_dir), "--holdout", "held", "-o", str(out), "--device", "cpu",
            "--size", "64", "--crops", "1", "--unet-steps", "0", "--vae-batch", "4", "--decoder-steps", "40",
            "--init-from", str(first)]
    result = CliRunner().invoke(cli, [*args, "--decoder-channels", "16", "--decoder-blocks", "3,1,1,0"])
    assert result.exit_code == 0, result.output
    before, after = load_models(str(first)), load_models(str(out))
    assert tuple(after.vae.config.decoder_block_out_channels) == (16,) * 4
    assert tuple(after.vae.config.num_decoder_blocks) == (3, 1, 1, 0)
    assert after.vae.config.scaling_factor == before.vae.config.scaling_factor
    for name, a, b in (("encoder", before.vae.encoder, after.vae.encoder), ("unet", before.unet, after.unet),
                       ("text_encoder", before.text_encoder, after.text_encoder)):
        sa, sb = a.state_dict(), b.state_dict()
        assert all(torch.equal(sa[k], sb[k]) for k in sa), name
    report = json.loads((out / "train_report.json").read_text())
    assert len([r for r in report["log"] if r["phase"] == "decoder"]) == 4  # fit + tune, first and last step each
    cfg = BaseTrainConfig(init_from=str(first), decoder_channels=16, decoder_blocks=(3, 1, 1, 0), seed=0)
    untrained = load_models(str(first))
    untrained.vae, fit = new_decoder(untrained, cfg)
    assert fit
    _, held = split_clips(clip_dir, ["held"])
    frames = validation_frames(held, 64)
    targets = with_targets(frames, 1)
    assert validate(after, frames, targets, 64)["mean_psnr"] > validate(untrained, frames, targets, 64)["mean_psnr"] + 1
    for opt, value, message in (("--decoder-blocks", "2,2", "needs 4 values"), ("--decoder-blocks", "2,-1,2,0", ">= 0"),
                                ("--decoder-steps", "0", "needs --decoder-steps")):
        extra = [opt, value] if opt != "--decoder-steps" else ["--decoder-channels", "16", opt, value]
        bad = CliRunner().invoke(cli, [*args, *extra])
        assert bad.exit_code != 0 and message in bad.output and "Traceback" not in bad.output, bad.output


def test_grown_decoder_decodes_exactly_as_before_and_trains_on(trained, clip_dir, tmp_path):
    """--decoder-blocks adding blocks at the same width grows the saved decoder: the grown one decodes exactly as
    the saved one (so no fitting stage), then the tuning changes it."""
    from streamedit.train.vae import new_decoder

    _, first, _ = trained
    before = load_models(str(first))
    assert tuple(before.vae.config.num_decoder_blocks) == (2, 2, 2, 0)
    cfg = BaseTrainConfig(init_from=str(first), decoder_blocks=(4, 3, 2, 0), seed=0)
    grown, fit = new_decoder(before, cfg)
    assert not fit and sum(p.numel() for p in grown.decoder.parameters()) > sum(
        p.numel() for p in before.vae.decoder.parameters())
    z = torch.randn(2, 8, 8, 8) * 2
    with torch.no_grad():
        torch.testing.assert_close(grown.decode(z).sample, before.vae.decode(z).sample, rtol=0, atol=1e-6)
    # a stage without blocks cannot grow exactly (its input is not a ReLU output): a new random decoder
    assert new_decoder(before, BaseTrainConfig(init_from=str(first), decoder_blocks=(2, 2, 2, 1)))[1]
    out = tmp_path / "grown"
    result = CliRunner().invoke(cli, ["train", "base", "--clips", str(clip_dir), "--holdout", "held", "-o", str(out),
                                      "--device", "cpu", "--size", "64", "--crops", "1", "--unet-steps", "0",
                                      "--vae-batch", "2", "--decoder-steps", "3", "--init-from", str(first),
                                      "--decoder-blocks", "4,3,2,0"])
    assert result.exit_code == 0, result.output
    report = json.loads((out / "train_report.json").read_text())
    assert len([r for r in report["log"] if r["phase"] == "decoder"]) == 2 and report["seconds"]["decoder_fit"] == 0
    after = load_models(str(out))
    assert tuple(after.vae.config.num_decoder_blocks) == (4, 3, 2, 0)
    with torch.no_grad():
        assert not torch.allclose(after.vae.decode(z).sample, before.vae.decode(z).sample, atol=1e-3)


def test_joint_decoder_trains_the_decoder_in_the_unet_steps(trained, clip_dir, tmp_path):
    """--joint-decoder: the U-Net steps also move the decoder (no decoder stage here); the encoder stays."""
    _, first, _ = trained
    args = ["train", "base", "--clips", str(clip_dir), "--holdout", "held", "--device", "cpu", "--size", "64",
            "--crops", "1", "--unet-steps", "3", "--batch", "4", "--decoder-steps", "0", "--init-from", str(first),
            "--pixel-weight", "10"]
    before = load_models(str(first))
    moved = {}
    for flag in (False, True):
        out = tmp_path / f"joint-{flag}"
        result = CliRunner().invoke(cli, [*args, "-o", str(out), *(["--joint-decoder"] if flag else [])])
        assert result.exit_code == 0, result.output
        after = load_models(str(out))
        a, b = before.vae.state_dict(), after.vae.state_dict()
        moved[flag] = {k for k in a if not torch.equal(a[k], b[k])}
    assert not moved[False]
    assert moved[True] and all(k.startswith("decoder.") for k in moved[True])


def test_psnr_per_frame():
    a = np.zeros((2, 4, 4, 3), np.uint8)
    b = a.copy()
    b[1] = 255
    out = psnr_per_frame(a, b)
    assert np.isinf(out[0]) and out[1] == pytest.approx(0.0)


def test_train_base_cli_bad_folder(tmp_path):
    result = CliRunner().invoke(cli, ["train", "base", "--clips", str(tmp_path / "none"), "-o", str(tmp_path / "o"),
                                      "--device", "cpu"])
    assert result.exit_code == 2 and "does not exist" in result.output


def _tiny_training_data(device="cpu", n=6, size=32, seed=0, arch="tiny", workers=1):
    """``random:<arch>`` models with the train-base precompute done on random crops and their filters
    (also scripts/gpu_train_check.py's data, at the demo size)."""
    from streamedit.models.architectures import build_random
    from streamedit.train.base import precompute
    from streamedit.train.data import with_targets

    rng = np.random.default_rng(seed)
    sources = (rng.random((n, size, size, 3)) * 255).astype(np.uint8)
    targets = with_targets(sources, workers=workers)
    models = build_random(arch, device=torch.device(device), dtype=torch.float32, seed=seed)
    src_t, tgt_t = torch.from_numpy(sources).to(device), torch.from_numpy(targets).to(device)
    return models, precompute(models, sources, src_t, tgt_t, 2.0)


def test_one_step_is_the_runtime_denoise():
    """The decoder is tuned on exactly the latents the runtime decodes."""
    from streamedit.diffusion.denoiser import Denoiser
    from streamedit.train.unet import one_step

    models, data = _tiny_training_data()
    gen = torch.Generator().manual_seed(1)
    noise = torch.randn(data["z_src"].shape, generator=gen)
    for strength in (0.15, 1.0):
        den = Denoiser(models, 1, 32, strength=strength)
        want = den.denoise(noise, data["z_src"], data["emb"][2])
        got = one_step(models, noise, data["z_src"], data["emb"][2], 32, strength)
        torch.testing.assert_close(got, want.float(), rtol=1e-5, atol=1e-5)


def test_tune_decoder_fits_the_unet_outputs_and_keeps_the_encoder():
    from streamedit.train.common import image_loss, to_pm1
    from streamedit.train.unet import one_step_latents, tune_decoder

    models, data = _tiny_training_data()
    cfg = BaseTrainConfig(size=32, vae_batch=6, decoder_steps=60, decoder_lr=2e-3, strength=0.15)
    latents = one_step_latents(models, data, cfg)
    scale = models.vae.config.scaling_factor

    def decoder_loss():
        with torch.no_grad():
            flat = latents.flatten(0, 1) / scale
            return float(image_loss(models.vae.decode(flat).sample, to_pm1(data["targets"].flatten(0, 1))))

    encoder = {k: v.clone() for k, v in models.vae.encoder.state_dict().items()}
    before = decoder_loss()
    rows = []
    tune_decoder(models, data, cfg, rows)
    assert decoder_loss() < 0.8 * before
    assert all(torch.equal(v, models.vae.encoder.state_dict()[k]) for k, v in encoder.items())
    assert not any(p.requires_grad for p in models.vae.parameters())
    assert [r["phase"] for r in rows] == ["decoder"] * len(rows) and rows[-1]["step"] == 59


def test_unet_loss_at_the_operating_point_is_the_runtime_output_error():
    """With the whole batch at the operating point, the velocity loss is the runtime's 1-step output error
    over strength^2, and --pixel-weight adds exactly that weight times the decoded image's L1."""
    import torch.nn.functional as F

    from streamedit.diffusion.denoiser import sigma_schedule, vae_image
    from streamedit.train.common import to_pm1
    from streamedit.train.unet import UNetStep, one_step

    models, data = _tiny_training_data()
    start, t_start = (float(v[0]) for v in sigma_schedule(models, 32, [0.15]))
    losses = {}
    for weight in (0.0, 3.0):
        cfg = BaseTrainConfig(size=32, unet_batch=4, pixel_batch=2, strength=0.15, one_step_fraction=1.0,
                              pixel_weight=weight)
        step = UNetStep(models, data, cfg, start, t_start)
        step.draw(torch.Generator().manual_seed(5))
        with torch.no_grad():
            losses[weight] = float(step.loss(style=1))
    idx, noise, scale = step.idx, step.noise, models.vae.config.scaling_factor
    x0 = one_step(models, noise, data["z_src"][idx], data["emb"][1][idx], 32, 0.15)
    z0 = data["z_tgt"][idx, 1] * scale
    assert losses[0.0] == pytest.approx(float(F.mse_loss(x0, z0)) / start ** 2, rel=1e-4)
    with torch.no_grad():
        l1 = float(F.l1_loss(vae_image(models.vae, x0[:2], scale).float(), to_pm1(data["targets"][idx[:2], 1])))
    assert losses[3.0] - losses[0.0] == pytest.approx(3.0 * l1, rel=1e-3)


def test_train_base_cli_checks_the_loss_options(tmp_path):
    for opt, value in (("--pixel-weight", "-1"), ("--one-step-fraction", "0"), ("--one-step-fraction", "1.5")):
        result = CliRunner().invoke(cli, ["train", "base", "--clips", str(tmp_path), "-o", str(tmp_path / "o"),
                                          opt, value, "--device", "cpu"])
        assert result.exit_code == 2 and opt in result.output, result.output
    result = CliRunner().invoke(cli, ["train", "base", "--clips", str(tmp_path), "-o", str(tmp_path / "o"),
                                      "--joint-decoder", "--pixel-weight", "0", "--device", "cpu"])
    assert result.exit_code == 2 and "needs --pixel-weight > 0" in result.output, result.output


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("joint_decoder", [False, True])
def test_graphed_unet_step_equals_the_eager_step(joint_decoder):
    """From the same weights, optimizer state and draws, a replayed step computes what the eager step does
    (scripts/gpu_train_check.py runs this on the GPU), also with the decoder trained in the same step.
    bf16 kernels are not bitwise reproducible, so the loss, gradients and weight update are compared to a
    tolerance far below what one step changes."""
    from streamedit.train.unet import UNetStep

    models, data = _tiny_training_data("cuda", n=16)
    cfg = BaseTrainConfig(size=32, unet_batch=8, pixel_batch=2, strength=0.15, joint_decoder=joint_decoder)
    models.unet.train().requires_grad_(True)
    step = UNetStep(models, data, cfg, 0.2, 200.0)
    gen = torch.Generator("cuda").manual_seed(0)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up (optimizer state, lazy initialisation), as train_unet does
        for i in range(4):
            step.draw(gen)
            step.eager(i % 2)
    torch.cuda.current_stream().wait_stream(side)
    step.draw(gen)
    tensors = step.params + [t for s in step.opt.state.values() for t in s.values() if torch.is_tensor(t)]
    start = [t.detach().clone() for t in tensors]
    results = {}
    for graphed in (False, True):
        with torch.no_grad():
            for t, t0 in zip(tensors, start):  # in place: the graph reads these very tensors
                t.copy_(t0)
        loss = (step.graphed if graphed else step.eager)(1).clone()
        torch.cuda.synchronize()
        results[graphed] = (loss, torch.cat([p.grad.flatten() for p in step.params]),
                            torch.cat([(p.detach() - p0).flatten() for p, p0 in zip(step.params, start)]))
    (loss_e, grad_e, move_e), (loss_g, grad_g, move_g) = results[False], results[True]
    assert step.graphs and move_e.norm() > 0
    assert len(step.params) == len(list(models.unet.parameters())) + joint_decoder * len(
        list(models.vae.decoder.parameters()))
    torch.testing.assert_close(loss_g, loss_e, rtol=1e-3, atol=0)
    assert (grad_g - grad_e).norm() < 1e-2 * grad_e.norm()
    assert (move_g - move_e).norm() < 5e-2 * move_e.norm()
