"""The typed contracts between the engine and its parts: option groups, the text-encoder protocol, the
batch record and totals."""

import dataclasses

import numpy as np
import pytest

from streamedit import EngineConfig, StreamEngine
from streamedit.config import GROUPS, TemporalOptions, TextOptions
from streamedit.telemetry import COMPONENTS, HOST_TIMINGS, SPANS, BatchRecord, EngineStats
from streamedit.text.base import TextEncoder
from streamedit.text.exact import TextEncoderRunner
from streamedit.text.fast import FastTextEncoderRunner


def test_every_option_is_in_exactly_one_group_and_the_views_agree():
    names = {f.name: f for f in dataclasses.fields(EngineConfig)}
    grouped = [f.metadata.get("group") for f in names.values()]
    assert None not in grouped and set(grouped) == set(GROUPS)
    for group, view in GROUPS.items():
        members = [n for n, f in names.items() if f.metadata["group"] == group]
        assert [f.name for f in dataclasses.fields(view)] == members, group
        for f in dataclasses.fields(view):  # the views' defaults cannot drift from the config's
            if names[f.name].default is not dataclasses.MISSING:
                assert f.default == names[f.name].default, (group, f.name)


def test_views_read_the_config_and_build_it_back():
    config = EngineConfig(prompt="ink", te_fast=True, te_size=256, lllite="random", hooks="down", compile=True,
                          cond_stagger=True, batch_size=4)
    assert config.text == TextOptions(te_fast=True, te_size=256)
    assert config.temporal == TemporalOptions(lllite="random", hooks="down", cond_stagger=True)
    assert config.compiling.compile and config.run.batch_size == 4 and config.schedule.pipeline
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.text.te_fast = False
    groups = (config.run, config.text, config.schedule, config.compiling, config.temporal)
    assert EngineConfig.from_groups(*groups) == config
    assert EngineConfig.from_groups(config.run, config.text) == dataclasses.replace(
        config, lllite=None, hooks=None, compile=False, cond_stagger=False)


def test_both_text_encoders_meet_the_protocol(tiny_models):
    exact, fast = TextEncoderRunner(tiny_models), FastTextEncoderRunner(tiny_models, 2)
    assert isinstance(exact, TextEncoder) and isinstance(fast, TextEncoder)
    frames = [np.zeros((64, 64, 3), np.uint8)] * 2
    assert exact.output_shape("ink") is None  # known after the first encode only
    out = exact.encode("ink", exact.prepare_images(frames), 2)
    assert fast.output_shape("ink") == tuple(out.shape[1:])
    assert set(exact.prepare_images(frames)) == {"pixel_values", "image_grid_thw"}


def test_the_engine_records_typed_batches(tiny_models, frames):
    config = EngineConfig(prompt="ink", batch_size=4, size=64, profile=True, lllite="random", te_refresh_every=2)
    with StreamEngine(tiny_models, config) as engine:  # closed: the shared U-Net loses the adapter's patch
        list(engine.run(frames))  # 10 frames: batches of 4, 4, 2
    log = engine.batch_log
    assert all(isinstance(r, BatchRecord) for r in log) and [r.batch for r in log] == [0, 1, 2]
    assert [r.frames for r in log] == [4, 4, 2] and [r.te for r in log] == ["computed", "reused", "computed"]
    assert log[0].cond == "start" and all(r.t_done >= r.t_launch for r in log)
    assert all(r.ms is None for r in log)  # CUDA-event spans: on CUDA only
    assert engine.stats == EngineStats(batches=3, frames=10, te_calls=2, te_frames=8)
    assert log[1].as_dict()["te"] == "reused"


def test_the_table_order_comes_from_the_spans():
    assert COMPONENTS == tuple(s.name for s in SPANS if s.name not in ("wait_side", "d2h")) + HOST_TIMINGS
    assert all(s.start != s.end for s in SPANS)
