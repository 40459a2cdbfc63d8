"""The multi-stream engine (engine/multi.py) against the single-stream engine: each stream's outputs are what
a StreamEngine of its own (batch 1, its prompt, its seed, fixed noise) makes of the same frames; no
cross-talk, prompt changes per stream, latest-frame-wins drops, join/leave, fairness, size groups, and the
temporal adapter's per-stream state."""

import math
import threading
import time

import numpy as np
import pytest
import torch

from streamedit import EngineConfig, StreamEngine
from streamedit.diffusion.denoiser import Denoiser
from streamedit.engine.multi import MultiStreamEngine
from streamedit.errors import StreameditError
from streamedit.temporal.adapter import LLLiteAdapter
from streamedit.text.exact import TextEncoderRunner

PROMPTS = ("oil painting", "watercolor", "pencil sketch")  # token counts differ: rows are padded and masked
TOL = 1  # uint8 levels: a batch of B may round a value differently from a batch of 1
# The tiny random model's decoder makes nearly black pixels whatever the latents (they depend on the noise,
# hardly on the frame or prompt), so frames and prompts are checked on the denoised latents too: another
# prompt moves them by ~2e-4, batching by ~1e-6.
LATENT_TOL = 2e-5


def pattern(k: int, t: int, h: int = 64, w: int = 64) -> np.ndarray:
    """Stream k's frame t: distinct smooth moving content per stream."""
    yy, xx = np.mgrid[0:h, 0:w]
    r = 127 + 120 * np.sin((xx + 3 * t + 11 * k) / (5.0 + 3 * k))
    g = 127 + 120 * np.cos((yy - 2 * t * (k + 1)) / (7.0 + k))
    b = 255.0 * ((xx * (k + 1) + yy + 5 * t) % 64) / 64
    return np.stack([r, g, b], -1).astype(np.uint8)


def single(models, prompt, seed, frames, spy=None, **kw):
    """What the sequential path makes of ``frames``: a batch-1 StreamEngine with this stream's options (with
    ``spy``: also its denoised latents, one (1,C,h,w) per frame)."""
    start = len(spy) if spy is not None else 0
    cfg = dict(prompt=prompt, batch_size=1, fixed_noise=True, seed=seed, size=64) | kw
    with StreamEngine(models, EngineConfig(**cfg)) as engine:
        out = list(engine.run(frames))
    return out if spy is None else (out, spy[start:])


@pytest.fixture()
def spy(monkeypatch):
    """Every denoised latent batch, in call order."""
    calls, real = [], Denoiser.denoise

    def denoise(self, *args, **kwargs):
        out = real(self, *args, **kwargs)
        calls.append(out.clone())
        return out

    monkeypatch.setattr(Denoiser, "denoise", denoise)
    return calls


def row_latents(engine, spy, stream) -> list:
    """The latents of ``stream``'s rows, tick by tick (engine.tick_log says which row it sat in)."""
    return [spy[i][rec.streams.index(stream.id)][None] for i, rec in enumerate(engine.tick_log)
            if stream.id in rec.streams]


def assert_latents(got, want):
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert (g - w).abs().max().item() <= LATENT_TOL


def assert_close(got, want):
    diff = np.abs(got.astype(np.int16) - want.astype(np.int16))
    assert got.shape == want.shape and diff.max() <= TOL, f"max diff {diff.max()}"


def multi(models, **kw):
    cfg = dict(prompt="oil painting", batch_size=4, fixed_noise=True, size=64)
    extra = {k: kw.pop(k) for k in ("max_streams", "buckets") if k in kw}
    return MultiStreamEngine(models, EngineConfig(**(cfg | kw)), **extra)


def stylize_threads():
    return {t for t in threading.enumerate() if t.name.startswith("streamedit")}


def test_streams_match_their_single_stream_engines(tiny_models, spy):
    """Three streams, distinct patterns, prompts and seeds, batched together every tick (bucket 4, one pad
    row): each stream gets exactly its own StreamEngine's outputs (and latents), in order, with its frame
    indices."""
    te = TextEncoderRunner(tiny_models)
    assert len({te.text_inputs(p)["input_ids"].shape[1] for p in PROMPTS}) > 1  # the padded, masked path runs
    with multi(tiny_models) as engine:
        streams = [engine.open_stream(p, seed=k) for k, p in enumerate(PROMPTS)]
        got = [[] for _ in streams]
        for t in range(3):
            for k, s in enumerate(streams):
                s.submit(pattern(k, t), meta=("cam", k, t))
            assert engine.tick() == 3
            for k, s in enumerate(streams):
                out = s.get(timeout=0)
                assert (out.index, out.meta) == (t, ("cam", k, t))
                got[k].append(out.image)
        assert engine.histogram == {3: 3} and engine.tick() == 0
        assert all(s.stats.as_dict()["processed"] == 3 and s.stats.dropped == 0 for s in streams)
        assert [len(rec.streams) for rec in engine.tick_log] == [4, 4, 4]
        lat = [row_latents(engine, spy, s) for s in streams]
    for k, prompt in enumerate(PROMPTS):
        want, want_lat = single(tiny_models, prompt, k, [pattern(k, t) for t in range(3)], spy=spy)
        assert_latents(lat[k], want_lat)
        for t in range(3):
            assert_close(got[k][t], want[t])
        # a stream's output is not another's: the comparison can fail
        assert np.abs(got[k][0].astype(int) - got[(k + 1) % 3][0].astype(int)).max() > 10


def tick_two(engine, a, b, ticks: int, switch_at: int) -> dict:
    """Streams a and b each submit pattern(k, t) and the engine ticks; a's prompt becomes "cartoon" from tick
    ``switch_at``. Returns each stream's output images."""
    outs = {a: [], b: []}
    for t in range(ticks):
        if t == switch_at:
            a.set_prompt("cartoon")
        for k, s in enumerate((a, b)):
            s.submit(pattern(k, t))
        engine.tick()
        for s in (a, b):
            outs[s].append(s.get(timeout=0).image)
    return outs


def test_prompt_change_affects_only_its_stream(tiny_models, spy):
    with multi(tiny_models) as engine:
        a, b = engine.open_stream("oil painting", seed=0), engine.open_stream("watercolor", seed=1)
        outs = tick_two(engine, a, b, ticks=4, switch_at=2)
        lat_a, lat_b = row_latents(engine, spy, a), row_latents(engine, spy, b)
        prompts = [rec.prompts[rec.streams.index(a.id)] for rec in engine.tick_log]
        assert prompts == ["oil painting"] * 2 + ["cartoon"] * 2
    frames_a, frames_b = [pattern(0, t) for t in range(4)], [pattern(1, t) for t in range(4)]
    before, before_lat = single(tiny_models, "oil painting", 0, frames_a, spy=spy)
    after, after_lat = single(tiny_models, "cartoon", 0, frames_a, spy=spy)
    assert_latents(lat_a, before_lat[:2] + after_lat[2:])
    assert (after_lat[2] - before_lat[2]).abs().max().item() > 5 * LATENT_TOL  # the comparison can fail
    for t in range(4):
        assert_close(outs[a][t], (before if t < 2 else after)[t])
    want, want_lat = single(tiny_models, "watercolor", 1, frames_b, spy=spy)
    assert_latents(lat_b, want_lat)
    for t in range(4):
        assert_close(outs[b][t], want[t])


def test_fast_text_encoder_one_length_for_every_prompt(tiny_models, spy):
    """With the fast TE the engine computes every prompt at one padded, masked length (rows.PROMPT_TOKENS:
    a prompt change never recompiles), and each stream still gets its own single-stream engine's latents;
    a prompt over the room is refused when set, the stream keeping its prompt, never in a tick."""
    with multi(tiny_models, te_fast=True) as engine:
        a, b = engine.open_stream("oil painting", seed=0), engine.open_stream("make it a watercolor", seed=1)
        with pytest.raises(StreameditError, match="too long"):
            a.set_prompt("an instruction far longer than any prompt should be " * 6)
        with pytest.raises(StreameditError, match="too long"):
            engine.open_stream("an instruction far longer than any prompt should be " * 6)
        assert a.prompt == "oil painting" and len(engine.streams) == 2
        tick_two(engine, a, b, ticks=3, switch_at=1)
        assert engine.stats.te_calls == 3  # two prompts per tick, one TE call (text/mixed.py)
        lat_a, lat_b = row_latents(engine, spy, a), row_latents(engine, spy, b)
        assert len({tuple(engine.te.text_mask(p).shape) for p in ("oil painting", "cartoon")}) == 1
    frames_a, frames_b = [pattern(0, t) for t in range(3)], [pattern(1, t) for t in range(3)]
    _, before = single(tiny_models, "oil painting", 0, frames_a, spy=spy, te_fast=True)
    _, after = single(tiny_models, "cartoon", 0, frames_a, spy=spy, te_fast=True)
    assert_latents(lat_a, before[:1] + after[1:])
    assert_latents(lat_b, single(tiny_models, "make it a watercolor", 1, frames_b, spy=spy, te_fast=True)[1])


def test_fast_te_keeps_a_graph_per_batch_size_across_ticks(tiny_models):
    """A tick's TE batch follows the streams that are ready (1, 2, 3 here): each size keeps its own graph, so
    going back to a size replays it (one graph, re-captured at every change, stalled the launches on an H100:
    docs/benchmarks.md, ninth session). StaticGraph off CUDA runs the function on its buffers, counting captures."""
    from streamedit.accel.graphs import StaticGraph

    with multi(tiny_models, te_fast=True) as engine:
        te = engine.te
        te.new_graph = lambda: StaticGraph(te.forward_fn, "cpu", name="te")  # what compile_te installs on CUDA
        streams = [engine.open_stream(p, seed=k) for k, p in enumerate(PROMPTS)]
        for t, ready in enumerate((1, 2, 1, 3, 2, 3, 1)):
            for s in streams[:ready]:
                s.submit(pattern(s.id, t))
            assert engine.tick() == ready
        assert sorted(te.graphs) == [1, 2, 3] and [g.captures for g in te.graphs.values()] == [1, 1, 1]


def test_te_batch_pads_to_captured_sizes():
    from streamedit.engine.rows import te_batch

    assert [te_batch(n, (1, 2, 4, 8)) for n in range(1, 9)] == [1, 2, 4, 4, 8, 8, 8, 8]
    assert te_batch(3, None) == 3 and te_batch(9, (1, 2)) == 9


def test_latest_frame_wins_counts_drops(tiny_models, spy):
    with multi(tiny_models) as engine:
        fast, calm = engine.open_stream("oil painting", seed=0), engine.open_stream("watercolor", seed=1)
        for t in range(3):  # three frames before a tick: the two older ones are dropped
            assert fast.submit(pattern(0, t)) == t
        calm.submit(pattern(1, 0))
        assert engine.tick() == 2
        out = fast.get(timeout=0)
        assert out.index == 2 and fast.outputs.empty()
        assert (fast.stats.submitted, fast.stats.processed, fast.stats.dropped) == (3, 1, 2)
        assert (calm.stats.submitted, calm.stats.processed, calm.stats.dropped) == (1, 1, 0)
        assert engine.report()["streams"][fast.id]["dropped"] == 2
        served = row_latents(engine, spy, fast)
    newest, newest_lat = single(tiny_models, "oil painting", 0, [pattern(0, 2)], spy=spy)
    assert_close(out.image, newest[0])
    assert_latents(served, newest_lat)
    _, oldest_lat = single(tiny_models, "oil painting", 0, [pattern(0, 0)], spy=spy)
    assert (oldest_lat[0] - newest_lat[0]).abs().max().item() > 5 * LATENT_TOL


@pytest.mark.parametrize("pipelined", [False, True])
def test_join_and_leave_while_running(tiny_models, pipelined):
    """With the tick thread on: a stream joins, another leaves, the rest keep producing; after close no
    thread of the engine is left, and a closed stream refuses frames. Pipelined (as on CUDA): launches and
    hand-outs on two threads, every output still handed out once."""
    before = stylize_threads()
    engine = multi(tiny_models, max_streams=3)
    engine.pipelined = pipelined
    counts = {}

    def feed(streams, n):
        base = {s.id: counts.get(s.id, 0) for s in streams}
        for t in range(n):
            for s in streams:
                s.submit(pattern(s.id % 3, t))
            deadline = time.monotonic() + 60
            while any(counts.get(s.id, 0) < base[s.id] + t + 1 for s in streams) and time.monotonic() < deadline:
                time.sleep(0.01)  # wait for this round's outputs (the engine runs on its own thread)

    def counter(sid):
        return lambda out: counts.__setitem__(sid, counts.get(sid, 0) + 1)

    a = engine.open_stream("oil painting", seed=0, on_output=counter(0))
    b = engine.open_stream("watercolor", seed=1, on_output=counter(1))
    engine.start()
    feed([a, b], 2)
    c = engine.open_stream("pencil sketch", seed=2, on_output=counter(2))
    with pytest.raises(StreameditError, match="at most 3"):
        engine.open_stream("cartoon")
    feed([a, b, c], 2)
    a.close()
    feed([b, c], 2)
    with pytest.raises(StreameditError, match="closed"):
        a.submit(pattern(0, 9))
    assert engine.report()["streams"][b.id]["fps"] > 0
    engine.stop()
    assert engine.error is None
    assert counts == {0: 4, 1: 6, 2: 4}
    assert [s.id for s in engine.streams] == [1, 2]
    engine.close()
    assert stylize_threads() <= before
    assert engine.streams == [] and b.closed


def test_fair_share_with_more_streams_than_the_largest_bucket(tiny_models):
    """Five always-ready streams, batches of at most 2: every stream is served within ceil(5/2) ticks."""
    served = []
    with multi(tiny_models, batch_size=2, max_streams=5) as engine:
        assert engine.buckets == (1, 2)
        streams = [engine.open_stream(PROMPTS[k % 3], seed=k, on_output=lambda o, k=k: served[-1].add(k))
                   for k in range(5)]
        for t in range(7):
            for k, s in enumerate(streams):
                s.submit(pattern(k, t))  # always something newer: the unserved ones drop their older frame
            served.append(set())
            assert engine.tick() == 2
        window = math.ceil(5 / 2)
        for start in range(len(served) - window + 1):
            assert set().union(*served[start:start + window]) == set(range(5)), served
        waiting = sum(s.pending is not None for s in streams)
        assert waiting == 3 and sum(s.stats.dropped for s in streams) == 5 * 7 - 2 * 7 - waiting
        assert engine.histogram == {2: 7}


def test_a_batch_in_flight_gathers_the_streams_frames(tiny_models):
    """Pipelined (as on CUDA), the launch after a batch waits while that batch is due to run (measured batch
    times) until every open stream has a frame, then serves them together; a stream with nothing to send
    holds the launch no longer than that; without measured times nothing waits."""
    def run(batch_s, senders):
        with multi(tiny_models, max_streams=3) as engine:
            streams = [engine.open_stream(PROMPTS[k], seed=k) for k in range(3)]
            for k, s in enumerate(streams):
                s.submit(pattern(k, 0))
            assert engine.tick() == 3  # warm (the first batch is slow on CPU)
            engine.pipelined = True  # on CPU a launch computes its batch; handing it out is what is deferred
            engine.batch_seconds[(64, 64)] = batch_s
            for k, s in enumerate(streams):
                s.submit(pattern(k, 1))
            engine.start()
            deadline = time.monotonic() + 60
            while len(engine.tick_log) < 2 and time.monotonic() < deadline:  # the first batch: launched
                time.sleep(0.001)
            for k in senders:
                streams[k].submit(pattern(k, 2))
            while engine.stats.frames < 6 + len(senders) and time.monotonic() < deadline:
                time.sleep(0.005)
            first, second = list(engine.tick_log)[1:3]
            engine.stop()
            rows = [sum(x is not None for x in r.streams) for r in (first, second)]
            return rows, second.t_launch - (first.t_launch + first.launch_ms / 1e3)  # after the first's launch

    rows, _ = run({1: 3.0, 2: 3.0, 4: 3.0}, senders=(0, 1, 2))
    assert rows == [3, 3]
    rows, gap = run({1: 3.0, 2: 3.0, 4: 3.0}, senders=(0, 1))  # stream 2 sends nothing
    assert rows == [3, 2] and gap > 0.5
    rows, gap = run({}, senders=(0, 1))
    assert rows == [3, 2] and gap < 0.5


def test_pipelined_at_most_two_batches_wait_for_hand_out(tiny_models):
    """Pipelined, a slow hand-out (outputs not on the host yet) holds the launches back at two batches in
    flight: latest-frame-wins keeps replacing the waiting frames instead of queueing more batches; between
    frames the tick thread sleeps."""
    lock, in_flight, peak, selects = threading.Lock(), [0], [0], []
    with multi(tiny_models, max_streams=1) as engine:
        stream = engine.open_stream("oil painting")
        stream.submit(pattern(0, 0))
        assert engine.tick() == 1  # warm (the first batch is slow on CPU)
        engine.pipelined = True
        launch, finish, select = engine._launch, engine._finish, engine._select

        def counted_launch(*args):
            tick = launch(*args)
            with lock:
                in_flight[0] += tick is not None
                peak[0] = max(peak[0], in_flight[0])
            return tick

        def slow_finish(tick):
            time.sleep(0.6)
            finish(tick)
            with lock:
                in_flight[0] -= 1

        def counted_select():
            selects.append(1)
            return select()

        engine._launch, engine._finish, engine._select = counted_launch, slow_finish, counted_select
        engine.start()
        for t in range(1, 7):
            stream.submit(pattern(0, t))
            time.sleep(0.05)
        deadline = time.monotonic() + 60
        while (in_flight[0] or stream.pending is not None) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert peak[0] == 2 and in_flight[0] == 0
        assert stream.stats.processed + stream.stats.dropped == 7 and stream.stats.dropped > 0
        selects.clear()  # frames slower than a hand-out: one batch in flight, then nothing to take
        for t in range(7, 10):
            stream.submit(pattern(0, t))
            time.sleep(1.0)
        engine.stop()
        assert stream.stats.processed + stream.stats.dropped == 10
        assert len(selects) <= 4  # the tick thread waits for frames, never spins while a batch is in flight


def test_sizes_are_grouped(tiny_models):
    """Three working sizes (64x64; 32x64 frames; 64x64 frames at size 32): separate batches, taking turns,
    each stream equal to its single-stream run. A warmed-up size runs a batch of each bucket first, and
    that leaves no trace in the counters."""
    with multi(tiny_models) as engine:
        assert engine.prepare((64, 64), warm=True) == (64, 64)
        assert sorted(engine.warm_seconds) == [((64, 64), b) for b in (1, 2, 4)]
        assert engine.stats.batches == 0 and not engine.tick_log and not engine.histogram
        square, wide = engine.open_stream("oil painting", seed=0), engine.open_stream("watercolor", seed=1)
        small = engine.open_stream("pencil sketch", seed=2, size=32)
        wide_frames = [np.ascontiguousarray(pattern(1, t)[::2]) for t in range(2)]  # 32x64
        got = {square: [], wide: [], small: []}
        for t in range(2):
            square.submit(pattern(0, t))
            wide.submit(wide_frames[t])
            small.submit(pattern(2, t))
            assert [engine.tick() for _ in range(3)] == [1, 1, 1]  # one size group per tick, all served
            for s in got:
                got[s].append(s.get(timeout=0).image)
        assert (square.shape, wide.shape, small.shape) == ((64, 64), (32, 64), (32, 32))
    for t, want in enumerate(single(tiny_models, "oil painting", 0, [pattern(0, t) for t in range(2)])):
        assert_close(got[square][t], want)
    for t, want in enumerate(single(tiny_models, "watercolor", 1, wide_frames)):
        assert_close(got[wide][t], want)
    for t, want in enumerate(single(tiny_models, "pencil sketch", 2, [pattern(2, t) for t in range(2)], size=32)):
        assert_close(got[small][t], want)


def test_bad_input_is_refused_per_stream(tiny_models):
    with multi(tiny_models) as engine:
        s = engine.open_stream("oil painting")
        with pytest.raises(StreameditError, match="HxWx3 uint8"):
            s.submit(np.zeros((8, 8), np.uint8))
        with pytest.raises(StreameditError, match="empty"):
            s.set_prompt("  ")
        assert s.stats.submitted == 0 and engine.tick() == 0
    with pytest.raises(StreameditError, match="single-stream"):
        multi(tiny_models, te_refresh_every=4)


@pytest.fixture()
def adapter(tiny_models):
    """A random adapter strong enough to show in the pixels (one object for both engines: same weights)."""
    torch.manual_seed(0)
    adapter = LLLiteAdapter.for_unet(tiny_models.unet, hooks="down", cond_size=64)
    with torch.no_grad():
        for _, module in adapter.items():
            module.up[0].weight.normal_(0, 0.05)
    return adapter


def test_temporal_state_is_per_stream(tiny_models, adapter, spy):
    """With the adapter, each stream's outputs equal its own single-stream run (previous output, flows,
    refresh schedule, scene cuts of its own), while streams come and go from ticks and so change rows (a
    moved stream's cond row is rewritten from its kept cond embedding); the U-Net is the shared one. A refresh's
    flow is started when its frame is submitted, and it is the flow the single-stream run computes."""
    present = [{0, 1, 2}, {1, 2}, {0, 2}, {0, 1, 2}, {0, 1}]  # tick -> streams with a frame
    kw = dict(lllite=adapter, cond_refresh_every=2)
    with multi(tiny_models, **kw) as engine:
        streams = [engine.open_stream(p, seed=k) for k, p in enumerate(PROMPTS)]
        sent, got = [[] for _ in streams], [[] for _ in streams]
        for tick, who in enumerate(present):
            for k in sorted(who):
                frame = pattern(k, 2 * tick)
                sent[k].append(frame)
                streams[k].submit(frame)
            assert engine.tick() == len(who)
            for k in who:
                got[k].append(streams[k].get(timeout=0).image)
        assert engine.adapter is adapter and engine.histogram == {3: 2, 2: 3}
        # the scheduled refreshes' flows were started when their frames were submitted (TemporalConditioner.early)
        assert [s.temporal.early_flows for s in streams] == [1, 1, 1]
        assert [rec.streams for rec in engine.tick_log][:2] == [(0, 1, 2, None), (2, 1)]  # stream 2 moved
        # rows written per tick, and of them the refreshed streams' (the cond CNN ran): the others are a moved
        # stream's kept embedding, copied (ticks 1 and 4: no refresh, one stream in a row another had)
        assert [(rec.cond_rows, rec.cond_embedded) for rec in engine.tick_log] == [(3, 3), (1, 0), (2, 1), (2, 2),
                                                                                   (1, 0)]
        # the launch by part: flows waited for and warped apart from the cond CNN and row writes
        assert all(list(rec.phases_ms) == ["rows", "stack", "text", "encode", "flow", "cond", "unet", "copy"]
                   for rec in engine.tick_log)
        lat = [row_latents(engine, spy, s) for s in streams]
    for k, prompt in enumerate(PROMPTS):
        want, want_lat = single(tiny_models, prompt, k, sent[k], spy=spy, **kw)
        assert_latents(lat[k], want_lat)
        for t in range(len(want)):
            assert_close(got[k][t], want[t])
    # the comparisons can fail: without the adapter, or with one temporal state for two streams
    _, plain = single(tiny_models, PROMPTS[0], 0, sent[0], spy=spy)
    assert min((a - b).abs().max().item() for a, b in zip(plain, lat[0])) > 100 * LATENT_TOL
    interleaved = [frame for t, own in enumerate(sent[0]) for frame in (pattern(1, t), own)]
    _, shared = single(tiny_models, PROMPTS[0], 0, interleaved, spy=spy, **kw)
    assert max((a - b).abs().max().item() for a, b in zip(shared[1::2], lat[0])) > 5 * LATENT_TOL


def test_serve_sessions_share_one_engine(tiny_models):
    """serve/runtime's shared factory: three sessions' worker threads call process() concurrently, without
    the server's engine lock; their frames are batched together and each session gets its own outputs."""
    from streamedit.serve.runtime import engine_factory

    before = stylize_threads()
    factory = engine_factory(tiny_models, shared=True, max_streams=3)
    handles = [factory(p, 64) for p in PROMPTS]
    assert all(h.concurrent for h in handles) and len({id(h.shared) for h in handles}) == 1
    got, errors = [[] for _ in handles], []

    def worker(k):
        try:
            for t in range(3):
                got[k] += handles[k].process([pattern(k, t)])
        except Exception as exc:  # noqa: BLE001  (reported by the assertion below)
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(k,)) for k in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    engine = handles[0].shared.engine
    histogram = dict(engine.histogram)
    for h in handles:
        h.close()
    factory.close()
    assert not errors and [len(g) for g in got] == [3, 3, 3]
    assert max(histogram) > 1, histogram  # sessions were batched together, not in turns
    assert handles[1].last_prompt == PROMPTS[1]
    for k, prompt in enumerate(PROMPTS):
        for t, want in enumerate(single(tiny_models, prompt, 0, [pattern(k, t) for t in range(3)])):
            assert_close(got[k][t], want)
    assert stylize_threads() <= before
