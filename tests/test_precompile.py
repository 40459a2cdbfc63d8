"""compile_cache.Precompiled: whole compiled functions saved to disk and loaded without tracing.

A small module's bound method through the ``aot_eager`` backend (fast on CPU); the engine's own
TE, U-Net + decode and VAE encode through inductor are covered by the startup test in
test_speed_features.py (two fresh processes, the second loads all three and traces nothing).
"""

import json
import logging

import pytest
import torch
from torch import nn

from streamedit.accel import compile_cache
from streamedit.accel.compile_cache import Precompiled


class Scaler:
    """What the engine compiles: a method of a plain object that holds modules, tensors and numbers."""

    def __init__(self, seed=0):
        torch.manual_seed(seed)
        self.net = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 4))
        self.offset = 1.0
        self.scale = torch.tensor(2.0)

    def run(self, x):
        with torch.no_grad():
            return self.net(x) * self.scale + self.offset

    def run_with_break(self, x):
        with torch.no_grad():
            y = self.net(x)
            torch._dynamo.graph_break()
            return y + self.offset


def _module_of_a_local_class(fn):
    """What ``kernels`` (a transformers >= 5.25 dependency) makes of ``apply_rotary_pos_emb``: an
    instance of an nn.Module class defined inside a function, held by a module-level name."""

    class Func(nn.Module):
        enabled = True  # a class constant the trace reads: a guard reached through the instance

        def forward(self, *args):
            return fn(*args) if self.enabled else args[0]

    return Func()


def _shift(x, by):
    return x + by


shift = _module_of_a_local_class(_shift)


class ShiftedScaler(Scaler):
    def __init__(self, seed=0):
        super().__init__(seed)
        self.funcs = {"shift": shift}  # as transformers' attention keeps it in ``_kernel_funcs``

    def run(self, x):
        with torch.no_grad():
            return self.funcs["shift"](self.net(x), self.offset)


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("STREAMEDIT_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(compile_cache, "STATS", dict.fromkeys(compile_cache.STATS, 0))
    monkeypatch.setattr(compile_cache, "SECONDS", {})
    monkeypatch.setattr(compile_cache, "FALLBACKS", {})
    torch._dynamo.reset()
    yield tmp_path
    torch._dynamo.reset()


def eager(obj, x):
    return obj.run(x)


def precompiled(obj, method="run", **kw):
    return Precompiled(getattr(obj, method), "key", "toy", None, "aot_eager", **kw)


def test_saved_then_loaded_by_a_new_object_with_live_weights(private_cache):
    x = torch.randn(3, 8)
    first = Scaler()
    assert torch.allclose(precompiled(first)(x), eager(first, x), atol=1e-6)
    assert compile_cache.STATS["compiled"] == 1
    (saved,) = (private_cache / "precompiled").glob("key-toy-*.bin")
    sources = json.loads(saved.with_suffix(".json").read_text())["sources"]
    assert __name__ in sources and all(len(h) == 64 for h in sources.values())

    torch._dynamo.reset()  # nothing left in memory: what a new process sees
    second = Scaler(seed=1)  # same shapes, other weights: the artifact reads them at each call
    fn = precompiled(second)
    assert torch.allclose(fn(x), eager(second, x), atol=1e-6)
    assert compile_cache.STATS == {"compiled": 1, "loaded": 1, "fallback": 0, "stale": 0}
    assert set(compile_cache.SECONDS) == {"compiled:toy", "loaded:toy"}  # what the first call of each spent
    with torch.no_grad():
        second.net[0].weight.mul_(-1)
        second.scale.fill_(3.0)
    assert torch.allclose(fn(x), eager(second, x), atol=1e-6)  # in-place changes are seen (no copy)


def test_weights_are_checked_by_metadata_not_by_guards(private_cache):
    """The weights' tensor guards are not saved (loading each one costs a fake tensor); their shapes,
    strides, dtypes, devices and requires_grad are, and a model whose weights differ compiles again."""
    x = torch.randn(3, 8)
    precompiled(Scaler())(x)
    (saved,) = (private_cache / "precompiled").glob("*.bin")
    weights = json.loads(saved.with_suffix(".json").read_text())["weights"]
    assert len(weights) == 4 and all("_parameters[" in name for name in weights)  # 2 Linears x (weight, bias)
    same = Scaler(seed=3)
    torch._dynamo.reset()
    fn = precompiled(same)
    assert torch.allclose(fn(x), eager(same, x), atol=1e-6) and fn.sources == ["loaded"]
    # (one artifact per input signature: each compile below replaces the saved one)
    wide = Scaler(seed=1)
    wide.net = nn.Sequential(nn.Linear(8, 32), nn.GELU(), nn.Linear(32, 4))  # same inputs and output, wider
    torch._dynamo.reset()
    fn = precompiled(wide)
    assert torch.allclose(fn(x), eager(wide, x), atol=1e-6) and fn.sources == ["compiled"]
    frozen = Scaler(seed=2)
    frozen.net.requires_grad_(False)
    torch._dynamo.reset()
    fn = precompiled(frozen)  # the artifact for requires_grad=True weights does not fit
    assert torch.allclose(fn(x), eager(frozen, x), atol=1e-6) and fn.sources == ["compiled"]


def test_new_shape_gets_its_own_artifact():
    obj, fn = Scaler(), None
    fn = precompiled(obj)
    for rows in (3, 5, 3):
        x = torch.randn(rows, 8)
        assert torch.allclose(fn(x), eager(obj, x), atol=1e-6)
    assert compile_cache.STATS["compiled"] == 2 and fn.sources == ["compiled", "compiled"]


def test_stale_source_or_corrupt_file_is_compiled_again(private_cache, caplog):
    x = torch.randn(3, 8)
    precompiled(Scaler())(x)
    (saved,) = (private_cache / "precompiled").glob("*.bin")
    meta = saved.with_suffix(".json")
    data = json.loads(meta.read_text())
    data["sources"][__name__] = "0" * 64  # as if this module had been edited since
    meta.write_text(json.dumps(data))
    obj = Scaler()
    assert torch.allclose(precompiled(obj)(x), eager(obj, x), atol=1e-6)
    assert compile_cache.STATS["stale"] == 1 and compile_cache.STATS["compiled"] == 2
    assert compile_cache.FALLBACKS == {"toy (compiled again)": "saved artifact is stale (its source changed)"}

    saved.write_bytes(b"not a compiled function")
    with caplog.at_level(logging.WARNING, logger="streamedit.accel.compile_cache"):
        assert torch.allclose(precompiled(obj)(x), eager(obj, x), atol=1e-6)
    assert "is unusable" in caplog.text and compile_cache.STATS["compiled"] == 3
    assert compile_cache.FALLBACKS["toy (compiled again)"].startswith("saved artifact is unusable: ")
    assert compile_cache.STATS["loaded"] == 0


def test_python_value_it_specialised_on(private_cache, caplog):
    """The artifact bakes ``offset`` in (a guard): a new value never reuses it silently."""
    x, obj = torch.randn(3, 8), Scaler()
    fn = precompiled(obj)
    fn(x)
    obj.offset = 5.0
    with caplog.at_level(logging.WARNING, logger="streamedit.accel.compile_cache"):
        assert torch.allclose(fn(x), eager(obj, x), atol=1e-6)  # guard failed -> traced compile
    assert "no longer fits" in caplog.text and compile_cache.STATS["fallback"] == 1
    # a variant that names the value keeps one artifact per value instead, each loadable
    torch._dynamo.reset()
    fn = precompiled(obj, variant=lambda: obj.offset)
    for offset in (1.0, 5.0, 1.0):
        obj.offset = offset
        assert torch.allclose(fn(x), eager(obj, x), atol=1e-6)
    assert fn.sources == ["compiled", "compiled"]
    assert len(list((private_cache / "precompiled").glob("*.bin"))) == 3


def test_graph_break_falls_back_to_torch_compile(caplog):
    x, obj = torch.randn(3, 8), Scaler()
    with caplog.at_level(logging.WARNING, logger="streamedit.accel.compile_cache"):
        out = precompiled(obj, method="run_with_break")(x)
    assert torch.allclose(out, obj.run_with_break(x), atol=1e-6)
    assert "cannot precompile toy" in caplog.text
    assert compile_cache.STATS == {"compiled": 0, "loaded": 0, "fallback": 1, "stale": 0}
    (why,) = compile_cache.FALLBACKS.values()  # the reason the startup report prints
    assert list(compile_cache.FALLBACKS) == ["toy"] and "cannot precompile toy" in why and "\n" not in why


def test_a_global_of_a_local_class_is_saved_and_loaded():
    """A traced call through a module-level instance of a function-local class (transformers 5.25's
    rotary function under ``kernels``): its guards, and those reached through it, cannot be written
    and are dropped; the function is still saved whole and loaded by the next object."""
    x = torch.randn(3, 8)
    first, second = ShiftedScaler(), ShiftedScaler(seed=1)
    with torch.no_grad():
        assert torch.allclose(precompiled(first)(x), first.net(x) + first.offset, atol=1e-6)
        assert torch.allclose(precompiled(second)(x), second.net(x) + second.offset, atol=1e-6)
    assert compile_cache.FALLBACKS == {}
    assert compile_cache.STATS == {"compiled": 1, "loaded": 1, "fallback": 0, "stale": 0}


def test_compiled_without_key_or_with_another_backend_is_plain_torch_compile():
    obj = Scaler()
    assert isinstance(compile_cache.compiled(obj.run, None, "aot_eager", "key", "toy"), Precompiled)
    for key, backend in ((None, "aot_eager"), ("key", "eager")):
        fn = compile_cache.compiled(obj.run, None, backend, key, "toy")
        assert not isinstance(fn, Precompiled)
        x = torch.randn(2, 8)
        assert torch.allclose(fn(x), eager(obj, x), atol=1e-6)


def test_prepare_loads_without_running(private_cache):
    """prepare() gets the function for a signature: compiled (saved), then loaded by a new object; once."""
    x = torch.randn(3, 8)
    assert precompiled(Scaler()).prepare(x) == "compiled"
    second = Scaler(seed=1)
    fn = precompiled(second)
    assert fn.prepare(x) == "loaded" and fn.prepare(x) == "loaded" and fn.sources == ["loaded"]
    assert set(compile_cache.SECONDS) == {"compiled:toy", "loaded:toy"}
    assert torch.allclose(fn(x), eager(second, x), atol=1e-6) and fn.sources == ["loaded"]
