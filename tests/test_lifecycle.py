"""Engine teardown (issue 23): close() / ``with StreamEngine(...)`` stops the engine's threads, takes the
adapter off the shared U-Net, releases its graphs and buffers, and the next engine on the same models
computes what a fresh one computes. The CUDA side of the same contract: test_gpu_lifecycle.py."""

import numpy as np
import pytest
import torch

from streamedit import EngineConfig, StreamEngine
from streamedit.errors import StreameditError
from streamedit.temporal.adapter import LLLiteAdapter


def _config(**kw):
    cfg = dict(prompt="oil painting", batch_size=2, size=64, seed=3, lllite="random", cond_refresh_every=2)
    cfg.update(kw)
    return EngineConfig(**cfg)


def _run(models, frames, **kw):
    torch.manual_seed(0)  # the same random adapter weights in every engine
    with StreamEngine(models, _config(**kw)) as engine:
        return np.stack(list(engine.run(frames))), engine


def _patched(unet) -> list[str]:
    """Names of the U-Net modules that still carry an instance-level forward (the LLLite patch)."""
    return [n for n, m in unet.named_modules() if "forward" in vars(m) or "_lllite_restore" in vars(m)]


def _alive(pool) -> list:
    return [t for t in pool._threads if t.is_alive()]


def test_close_stops_threads_unpatches_and_releases(tiny_models, frames):
    engine = StreamEngine(tiny_models, _config(te_fast=True, cond_stagger=True))
    engine.temporal._graphs = {}  # StaticGraph's CPU path: the graph bookkeeping close() must release
    out = list(engine.run(frames))
    assert len(out) == len(frames) and engine.temporal._graphs and _patched(tiny_models.unet)
    assert engine.adapter.rows == 2 and engine.te.c
    engine.close()
    assert not _alive(engine._pool) and not _alive(engine.temporal._pool)
    assert _patched(tiny_models.unet) == []
    assert engine.temporal._graphs == {} and engine.temporal._prev_output is None and not engine.te.c
    assert engine.adapter.rows == 0 and all(m.cond_emb.numel() == 0 for _, m in engine.adapter.items())
    assert len(engine.batch_log) == len(frames) // 2 and engine.stats.frames == len(frames)  # still readable
    with pytest.raises(StreameditError, match="closed"):
        list(engine.run(frames))
    engine.close()  # idempotent


def test_next_engine_on_the_same_models_equals_a_fresh_one(tiny_models, frames):
    fresh, _ = _run(tiny_models, frames)
    other, _ = _run(tiny_models, frames, te_fast=True, cond_stagger=True, cond_refresh_every=3, seed=7)
    assert not np.array_equal(fresh, other)  # a different engine really ran in between
    again, _ = _run(tiny_models, frames)
    np.testing.assert_array_equal(again, fresh)
    eager, _ = _run(tiny_models, frames, lllite=None)
    np.testing.assert_array_equal(_run(tiny_models, frames)[0], fresh)  # after an engine without adapter too
    assert not np.array_equal(eager, fresh)


def test_a_given_adapter_survives_the_engines_that_used_it(tiny_models, frames):
    torch.manual_seed(1)
    adapter = LLLiteAdapter.for_unet(tiny_models.unet, hooks="down", cond_size=64)
    with torch.no_grad():
        for _, m in adapter.items():
            m.up[0].weight.normal_(0, 0.5)
    first, _ = _run(tiny_models, frames, lllite=adapter)
    second, engine = _run(tiny_models, frames, lllite=adapter)
    np.testing.assert_array_equal(first, second)
    assert engine.adapter is adapter and adapter.rows == 2  # the caller's adapter keeps its buffers


def test_context_manager_closes_on_error(tiny_models, frames):
    with pytest.raises(RuntimeError, match="boom"):
        with StreamEngine(tiny_models, _config()) as engine:
            next(iter(engine.run(frames)))
            raise RuntimeError("boom")
    assert engine._closed and _patched(tiny_models.unet) == [] and not _alive(engine._pool)


def test_close_stops_the_low_latency_reader_of_an_unfinished_run(tiny_models, frames):
    engine = StreamEngine(tiny_models, _config(batch_size=1, low_latency=True, prefetch=1))
    gen = engine.run(iter(frames))
    next(gen)  # suspended mid-stream: the reader thread is still pulling frames
    thread, _ = engine._reader
    assert thread.is_alive()
    engine.close()
    assert not thread.is_alive() and _patched(tiny_models.unet) == []
    gen.close()


def test_failed_construction_leaves_the_unet_unpatched(tiny_models, frames):
    with pytest.raises(Exception, match="nope"):
        # frame_size: the working size is known, so the engine compiles at construction
        StreamEngine(tiny_models, _config(compile=True, compile_vae=False, compile_backend="nope", frame_size=(64, 64)))
    assert _patched(tiny_models.unet) == []
    with pytest.raises(StreameditError, match="prompt is empty"):
        StreamEngine(tiny_models, _config(prompt="  "))
    assert _patched(tiny_models.unet) == []
    out, _ = _run(tiny_models, frames[:4])  # the models are still usable
    assert len(out) == 4


# the random adapter's 1e-3 weights barely reach uint8 outputs: a strong multiplier makes a stale cond visible
@pytest.mark.parametrize("kw", [dict(lllite_multiplier=300.0),
                                dict(cut_refresh=False, cond_refresh_every=3, lllite_multiplier=300.0),
                                dict(te_fast=True, cond_stagger=True, cond_refresh_every=3, lllite_multiplier=300.0),
                                dict(lllite=None, skip_similar=0.5, te_refresh_every=2)],
                         ids=["adapter", "adapter-no-cuts", "stagger", "filters"])
def test_restart_equals_a_fresh_engine(tiny_models, frames, kw):
    """scale/shards.py runs a worker's shards on one engine: after restart() a run computes what a fresh
    engine computes, whatever the run before it left (noise drawn, temporal state, cond rows, TE cache)."""
    fresh, _ = _run(tiny_models, frames, **kw)
    torch.manual_seed(0)
    with StreamEngine(tiny_models, _config(**kw)) as engine:
        other = np.stack(list(engine.run(frames[::-1][:7])))  # another clip, an odd length: a padded last batch
        assert not np.array_equal(other[:7], fresh[:7])
        engine.restart()
        again = np.stack(list(engine.run(frames)))
        assert engine.stats.frames == len(frames)
    np.testing.assert_array_equal(again, fresh)


def test_restart_refuses_a_run_in_progress(tiny_models, frames):
    with StreamEngine(tiny_models, _config()) as engine:
        run = engine.run(frames)
        next(run)
        with pytest.raises(StreameditError, match="restart"):
            engine.restart()
        run.close()
        engine.restart()  # a run stopped early is over
        assert len(list(engine.run(frames))) == len(frames)
