"""A scene cut in the middle of a batch (issue 29): no row whose frame is in the new shot may be conditioned on
the old shot. Rows before the cut keep the old shot's cond; rows from the cut get the shot-start convention
(their own input frame) until a cond built from the new shot's output exists, which the batch after the cut
builds. Drives the real TemporalConditioner (plain and staggered refresh) and the multi-stream engine."""

import cv2
import numpy as np
import pytest
import torch

from streamedit import EngineConfig, StreamEngine
from streamedit.engine.multi import MultiStreamEngine
from streamedit.temporal.adapter import LLLiteAdapter
from streamedit.temporal.conditioner import TemporalConditioner, cond_flow, warp_output

B, CUT, FRAMES, SIZE = 4, 10, 48, 64  # the cut: frame 10 = slot 2 of batch 2


def _textured(seed):
    base = np.random.default_rng(seed).integers(0, 255, (SIZE // 8, SIZE // 8, 3), dtype=np.uint8)
    return cv2.resize(base, (SIZE, SIZE), interpolation=cv2.INTER_CUBIC)


def _clip(n=FRAMES, cut=CUT):
    a, b = _textured(1), 255 - _textured(2) // 3  # a much brighter histogram: the detector's cut
    return [np.roll(a if i < cut else b, i, axis=1) for i in range(n)]  # all distinct


class RowCond:
    """A stand-in adapter that keeps each row's cond image (uint8 values as float) instead of its embedding."""

    def __init__(self):
        self.cond = None

    def parameters(self):
        yield torch.zeros(1)

    @property
    def rows(self):
        return 0 if self.cond is None else len(self.cond)

    def set_cond_image(self, images):
        self.cond = images.float().clone()

    def set_cond_rows(self, images, rows):  # the staggered path writes [-1, 1] floats
        self.cond[rows] = ((images + 1.0) * 127.5).round() if images.is_floating_point() else images.float()


def _source(cond, frames):
    """Where a row's cond image came from: ("input", a) if it is frame a itself, ("output", s) if it is the
    (constant, so any warp leaves it as is) output of frame s."""
    img = cond.permute(1, 2, 0).numpy()
    if img.min() == img.max():
        return "output", int((img[0, 0, 0] - 5) // 5)
    hits = [a for a, f in enumerate(frames) if np.array_equal(img, f)]
    assert len(hits) == 1, "neither an input frame nor an output"
    return "input", hits[0]


def _run(refresh, stagger):
    """Per frame, the source of its row's cond; and the batches that refreshed."""
    frames, adapter = _clip(), RowCond()
    outputs = [np.full((SIZE, SIZE, 3), 5 * t + 5, np.uint8) for t in range(FRAMES)]  # frame t's output: 5t + 5
    tc = TemporalConditioner(adapter, refresh_every=refresh, cut_refresh=True, stagger=stagger)
    got, refreshed = [], []
    for b, k in enumerate(range(0, FRAMES, B)):
        chunk = frames[k:k + B]
        plan = tc.plan(chunk, B)
        tc.apply(plan, torch.from_numpy(np.stack(chunk)), {})
        refreshed += [b] if plan.refresh and plan.slots is None else []
        got += [_source(adapter.cond[j], frames) for j in range(B)]
        tc.remember(torch.from_numpy(np.stack(outputs[k:k + B])), B)
    tc.close()
    return got, refreshed


@pytest.mark.parametrize("refresh,stagger", [(1, False), (8, False), (8, True), (3, True)])
def test_mid_batch_cut_rows(refresh, stagger):
    got, refreshed = _run(refresh, stagger)
    cut_batch = CUT // B * B
    # the cut's batch: before the cut the old shot's previous output warped (the old cond), from it the input
    assert got[cut_batch:cut_batch + B] == [("output", cut_batch - 1)] * (CUT - cut_batch) + \
        [("input", t) for t in range(CUT, cut_batch + B)]
    # the batch after: every row built from the new shot's first output (the cut batch's last frame)
    assert got[cut_batch + B:cut_batch + 2 * B] == [("output", cut_batch + B - 1)] * B
    # no frame of the new shot, ever, on a cond from the old shot (input or output)
    assert [t for t in range(CUT, FRAMES) if got[t][1] < CUT] == []
    if not stagger:  # refresh counting restarts at the batch after the cut
        want = [0, 2, 3] + list(range(3 + refresh, FRAMES // B, refresh))
        assert refreshed == (list(range(FRAMES // B)) if refresh == 1 else want)


def test_engine_refreshes_cond_and_te_after_a_mid_batch_cut(tiny_models):
    """The single-stream engine: the cut's batch and the one after refresh the cond and the (reused) TE."""
    cfg = EngineConfig(prompt="oil painting", batch_size=B, size=SIZE, seed=0, fixed_noise=True, lllite="random",
                       cond_refresh_every=8, te_refresh_every=100)
    with StreamEngine(tiny_models, cfg) as engine:
        assert len(list(engine.run(_clip(24)))) == 24
        log = list(engine.batch_log)
    assert [e.cond for e in log] == ["start", "reuse", "cut", "after_cut", "reuse", "reuse"]
    assert log[2].cut_at == CUT % B
    assert [e.batch for e in log if e.te == "computed"] == [0, 2, 3]


def test_multistream_cut_row(tiny_models):
    """The multi-stream engine plans each stream one frame at a time, so a cut starts its stream's 'batch':
    the cut frame's cond is its input, kept until the next refresh, which warps the new shot's output."""
    torch.manual_seed(0)
    adapter = LLLiteAdapter.for_unet(tiny_models.unet, hooks="down", cond_size=SIZE)
    frames, cut = _clip(10, 5), 5
    cfg = EngineConfig(prompt="oil painting", batch_size=2, fixed_noise=True, size=SIZE, lllite=adapter,
                       cond_refresh_every=3)
    conds, outs, embedded = [], [], []
    row_embeddings = adapter.row_embeddings

    def spy(images):  # the cond images the cond CNN embeds (the stream keeps only the embedding)
        embedded.append(images[0].permute(1, 2, 0).numpy().copy())
        return row_embeddings(images)

    adapter.row_embeddings = spy
    with MultiStreamEngine(tiny_models, cfg) as engine:
        assert engine.adapter is adapter
        stream = engine.open_stream("oil painting", seed=0)
        for frame in frames:
            stream.submit(frame)
            assert engine.tick() == 1
            outs.append(stream.get(timeout=0).image)
            conds.append(embedded[-1])
    refresh = [t for t in range(1, len(frames)) if not np.array_equal(conds[t], conds[t - 1])]
    assert refresh == [3, 5, 8]  # schedule, the cut, schedule (counted from the cut)
    for t in (5, 6, 7):
        assert np.array_equal(conds[t], frames[cut])
    flow = torch.from_numpy(cond_flow(frames[8], frames[7]))[None]
    want = warp_output(torch.from_numpy(outs[7]).permute(2, 0, 1), flow)[0].to(torch.uint8).permute(1, 2, 0)
    assert np.array_equal(conds[8], want.numpy())
