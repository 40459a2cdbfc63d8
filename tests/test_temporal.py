"""Temporal conditioning: refresh schedule, scene cuts, flow warping and the engine integration."""

import numpy as np
import pytest
import torch

from streamedit import EngineConfig, StreamEngine
from streamedit.temporal.adapter import LLLiteAdapter
from streamedit.temporal.conditioner import SceneCutDetector, farneback, warp


def _textured(seed=0, size=64):
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 255, (size // 8, size // 8, 3), dtype=np.uint8)
    import cv2

    return cv2.resize(base, (size, size), interpolation=cv2.INTER_CUBIC)


def _clip_with_cut(n=40, cut=20, size=64):
    a, b = _textured(1, size), 255 - _textured(2, size) // 3  # different shot: much brighter histogram
    return [np.roll(a if i < cut else b, i % 7, axis=1) for i in range(n)]


def _engine(models, frames_seen=None, **kw):
    cfg = dict(prompt="oil painting", batch_size=4, size=64, seed=0, fixed_noise=True, lllite="random",
               cond_refresh_every=8)
    cfg.update(kw)
    return StreamEngine(models, EngineConfig(**cfg))


def _refreshes(engine):
    return [e.batch for e in engine.batch_log if e.cond != "reuse"]


def test_cut_forces_refresh_exactly_at_its_batch(tiny_models):
    engine = _engine(tiny_models)
    out = list(engine.run(_clip_with_cut()))
    engine.close()
    assert len(out) == 40
    assert _refreshes(engine) == [0, 5]  # start, then the batch holding frame 20 (20 // 4)
    assert engine.batch_log[5].cond == "cut" and engine.batch_log[5].cut_at == 0


def test_no_cut_refreshes_only_on_schedule(tiny_models):
    frames = [np.roll(_textured(1), i, axis=1) for i in range(72)]
    engine = _engine(tiny_models)
    list(engine.run(frames))
    engine.close()
    assert _refreshes(engine) == [0, 8, 16]
    assert {e.cond for e in engine.batch_log} == {"start", "schedule", "reuse"}


def test_cut_forces_te_refresh_when_te_is_reused(tiny_models):
    engine = _engine(tiny_models, lllite=None, te_refresh_every=100)
    list(engine.run(_clip_with_cut()))
    engine.close()
    assert [e.batch for e in engine.batch_log if e.te == "computed"] == [0, 5]


def test_cond_cnn_and_flow_skipped_on_reuse_batches(tiny_models, monkeypatch):
    frames = [np.roll(_textured(3), 2 * i, axis=1) for i in range(40)]
    engine = _engine(tiny_models, cond_refresh_every=3)
    calls, flows = [], []
    real_set = engine.adapter.set_cond_image
    monkeypatch.setattr(engine.adapter, "set_cond_image", lambda img: (calls.append(img.clone()), real_set(img)))
    import streamedit.temporal.conditioner as temporal

    real_fb = temporal.farneback
    monkeypatch.setattr(temporal, "farneback", lambda *a: (flows.append(1), real_fb(*a))[1])
    list(engine.run(frames))
    engine.close()
    assert _refreshes(engine) == [0, 3, 6, 9]
    assert len(calls) == 4
    assert len(flows) == 3 * 4  # one flow per frame of each refresh batch after the first
    # first batch: the input frames themselves are the cond images
    first = torch.from_numpy(np.stack(frames[:4])).permute(0, 3, 1, 2)
    assert torch.equal(calls[0], first)
    # later refreshes: the previous output warped, not the inputs
    assert not torch.equal(calls[1], torch.from_numpy(np.stack(frames[12:16])).permute(0, 3, 1, 2))


def test_adapter_changes_output_and_detaches(tiny_models, frames):
    base = list(StreamEngine(tiny_models, EngineConfig(prompt="p", batch_size=2, size=64, fixed_noise=True)).run(frames))
    adapter = LLLiteAdapter.for_unet(tiny_models.unet, hooks="all", cond_size=64)
    with torch.no_grad():
        for _, m in adapter.items():
            m.up[0].weight.normal_(0, 0.5)
    engine = StreamEngine(tiny_models, EngineConfig(prompt="p", batch_size=2, size=64, fixed_noise=True,
                                                    lllite=adapter, hooks="all"))
    with_adapter = list(engine.run(frames))
    engine.close()
    assert any(not np.array_equal(a, b) for a, b in zip(base, with_adapter))
    again = list(StreamEngine(tiny_models, EngineConfig(prompt="p", batch_size=2, size=64, fixed_noise=True)).run(frames))
    assert all(np.array_equal(a, b) for a, b in zip(base, again))  # close() restored the U-Net


def test_motion_refresh_triggers_early(tiny_models):
    frames = [np.roll(_textured(4), 6 * i, axis=1) for i in range(32)]
    engine = _engine(tiny_models, motion_refresh=10.0, cond_refresh_every=100)
    list(engine.run(frames))
    engine.close()
    refreshes = _refreshes(engine)
    assert len(refreshes) > 1 and all(engine.batch_log[b].cond in ("start", "motion") for b in refreshes)
    calm = _engine(tiny_models, motion_refresh=10.0, cond_refresh_every=100)
    list(calm.run([_textured(4)] * 32))
    calm.close()
    assert _refreshes(calm) == [0]


def test_farneback_warp_aligns_translated_frames():
    a = _textured(5, 96)
    b = np.roll(a, 3, axis=1)  # content moves 3 px right
    flow = farneback(b, a)  # on b's grid, pointing into a
    assert abs(float(np.median(flow[..., 0])) + 3) < 0.5
    warped = warp(torch.from_numpy(a).permute(2, 0, 1)[None].float(), torch.from_numpy(flow)[None])
    warped = warped[0].permute(1, 2, 0).numpy()
    inner = (slice(8, -8), slice(8, -8))
    err = np.abs(warped[inner] - b[inner].astype(np.float32)).mean()
    assert err < 0.25 * np.abs(a[inner].astype(np.float32) - b[inner]).mean()


def test_warp_is_grid_sample_at_pixel_plus_flow():
    g = torch.Generator().manual_seed(0)
    images, flows = torch.rand(2, 3, 24, 40, generator=g), torch.randn(2, 24, 40, 2, generator=g) * 3
    ys, xs = torch.meshgrid(torch.arange(24.0), torch.arange(40.0), indexing="ij")
    grid = torch.stack([(xs + flows[..., 0]) / 39 * 2 - 1, (ys + flows[..., 1]) / 23 * 2 - 1], dim=-1)
    want = torch.nn.functional.grid_sample(images, grid, padding_mode="border", align_corners=True)
    assert torch.allclose(warp(images, flows), want, atol=1e-5)
    assert torch.allclose(warp(images, torch.zeros_like(flows)), images, atol=1e-5)


@pytest.mark.parametrize("flow_size", [32])
def test_reduced_resolution_flow_scales_vectors(flow_size):
    a = _textured(6, 96)
    flow = farneback(np.roll(a, 4, axis=1), a, size=flow_size)
    assert flow.shape == (96, 96, 2)
    assert abs(float(np.median(flow[..., 0])) + 4) < 1.5


def test_scene_cut_detector():
    det = SceneCutDetector()
    clip = _clip_with_cut()
    cuts = [i for i, f in enumerate(clip) if det.update(f)]
    assert cuts == [20]


@pytest.mark.parametrize("graph", [False, True])  # graph: StaticGraph's CPU path (same buffers, no capture)
def test_staggered_refresh_rebuilds_each_slot_every_n_batches(tiny_models, monkeypatch, graph):
    frames = [np.roll(_textured(6), 3 * i, axis=1) for i in range(4 * 9)]
    engine = _engine(tiny_models, cond_refresh_every=4, cond_stagger=True)
    engine.temporal._graphs = {} if graph else None
    adapter, writes, snapshots = engine.adapter, [], []
    real_rows = adapter.set_cond_rows

    def spy(images, rows):
        writes.append((images.clone(), rows.tolist()))
        snapshots.append([m.cond_emb.clone() for _, m in adapter.items()])
        real_rows(images, rows)

    monkeypatch.setattr(adapter, "set_cond_rows", spy)
    import streamedit.temporal.conditioner as temporal

    flows = []
    real_fb = temporal.farneback
    monkeypatch.setattr(temporal, "farneback", lambda *a: (flows.append(1), real_fb(*a))[1])
    list(engine.run(frames))
    log = engine.batch_log
    assert log[0].cond == "start" and all(e.cond == "stagger" for e in log[1:])
    stagger_rows = [rows for _, rows in writes if len(rows) == 1]
    # batch k refreshes slot j with (k - j) % 4 == 0: slots 1, 2, 3, 0, 1, ... one per batch
    assert [r[0] for r in stagger_rows] == [k % 4 for k in range(1, 9)]
    assert len(flows) == 8  # one flow per staggered slot, none for the start batch
    # each write changes exactly its own row of every hook's buffer, to the embedding of its image
    images, rows = writes[-1]
    assert images.is_floating_point()  # the warped output's uint8 values, mapped to [-1, 1] as set_cond_image does
    assert torch.equal(images, torch.round((images + 1.0) * 127.5).clamp(0, 255) / 127.5 - 1.0)
    after = [m.cond_emb for _, m in adapter.items()]
    for (_, m), before, now in zip(adapter.items(), snapshots[-1], after):
        others = [i for i in range(4) if i not in rows]
        assert torch.equal(now[others], before[others])
        with torch.no_grad():
            expect = m.embed(images if images.is_floating_point() else images.float() / 127.5 - 1.0)
        assert torch.allclose(now[rows], expect, atol=1e-6)
    assert not torch.equal(after[0][rows], snapshots[-1][0][rows])
    engine.close()  # after the checks: close() frees the cond buffers of an adapter the engine built


def test_set_cond_rows_equals_full_set_cond_image(tiny_models):
    adapter = LLLiteAdapter.for_unet(tiny_models.unet, hooks="all", cond_size=64)
    adapter.inference_mode = True
    rng = np.random.default_rng(0)
    images = torch.from_numpy(rng.integers(0, 255, (4, 3, 64, 64), dtype=np.uint8))
    adapter.set_cond_image(images)
    full = [m.cond_emb.clone() for _, m in adapter.items()]
    adapter.set_cond_image(torch.zeros_like(images))
    adapter.set_cond_rows(images[[2, 0]], torch.tensor([2, 0]))
    for (_, m), ref in zip(adapter.items(), full):
        assert torch.allclose(m.cond_emb[[0, 2]], ref[[0, 2]], atol=1e-6)
        assert not torch.allclose(m.cond_emb[[1, 3]], ref[[1, 3]])  # untouched rows kept the zero image's


def test_early_flow_is_used_only_against_the_same_previous_frame():
    """early() (a multi-stream engine starts a refresh's flow when the frame is submitted): None until a
    refresh is due; plan() takes it when the previous frame is the one it was computed against, and
    otherwise computes the flow itself (the early one is cancelled or ignored), so outputs never change."""
    from streamedit.temporal.conditioner import TemporalConditioner, cond_flow

    frames = [np.roll(_textured(), 2 * t, axis=1) for t in range(6)]
    cond = TemporalConditioner(None, refresh_every=2, cut_refresh=False, workers=1)
    try:
        assert cond.early(frames[0]) is None  # nothing to flow from yet
        cond.plan([frames[0]], 1)
        assert cond.early(frames[1]) is None  # 1 of 2: no refresh due
        cond.plan([frames[1]], 1)
        early = cond.early(frames[2])
        assert early is not None and early.hist is None and early.prev is frames[1]
        flow = early.flow
        plan = cond.plan([frames[2]], 1, early)
        assert plan.refresh and plan.flows[0] is flow and cond.early_flows == 1
        cond.plan([frames[3]], 1)
        stale = cond.early(frames[5])  # against frames[3]; frames[4] is planned first
        assert stale is not None
        cond.plan([frames[4]], 1, cond.early(frames[4]))
        cond.plan([frames[5]], 1)  # not due (refresh at 4): no flows, nothing taken
        cond.plan([frames[1]], 1, stale)  # due, but against frames[5], not frames[3]
        assert cond.early_flows == 2  # frames[4]'s only
        assert stale.flow.cancelled() or stale.flow.done()
    finally:
        cond.close()
    fresh = TemporalConditioner(None, refresh_every=1, cut_refresh=False, workers=1)
    try:
        fresh.plan([frames[5]], 1)
        got = fresh.plan([frames[1]], 1, stale)  # a mismatched early flow is not used: the flow is its own
        assert got.flows[0] is not stale.flow
        np.testing.assert_array_equal(got.flows[0].result()[0], cond_flow(frames[1], frames[5], None, "backward"))
    finally:
        fresh.close()


def test_early_cut_histograms_plan_as_without():
    """early()'s scene-cut histogram (computed when a frame is submitted) gives plan() the same cuts and
    refreshes as computing it in plan(): a sequence with two cuts, planned both ways."""
    from streamedit.temporal.conditioner import TemporalConditioner

    base = _textured()
    shots = [base, np.full_like(base, 30), np.full_like(base, 220)]
    frames = [np.roll(shots[t // 4], t, axis=1) for t in range(12)]  # cuts at 4 and 8
    runs = []
    for use_early in (False, True):
        cond = TemporalConditioner(None, refresh_every=3, cut_refresh=True, workers=1)
        try:
            plans = []
            for f in frames:
                early = cond.early(f) if use_early else None
                assert not use_early or (early is not None and early.hist is not None)
                plans.append(cond.plan([f], 1, early).reason)
            runs.append(plans)
        finally:
            cond.close()
    assert runs[0] == runs[1] and runs[0].count("cut") == 2, runs
