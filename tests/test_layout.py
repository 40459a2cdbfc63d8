"""The package layout stays a one-way graph: no import cycles, and the old 0.1 paths keep working for a release."""

from __future__ import annotations

import ast
import importlib
import json
import subprocess
import sys
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
PKG = "streamedit"


def modules() -> dict[str, tuple[Path, bool]]:
    out = {}
    for path in sorted((SRC / PKG).rglob("*.py")):
        parts = list(path.relative_to(SRC).with_suffix("").parts)
        is_pkg = parts[-1] == "__init__"
        out[".".join(parts[:-1] if is_pkg else parts)] = (path, is_pkg)
    return out


def _targets(mods, name: str, is_pkg: bool, node) -> list[str]:
    if isinstance(node, ast.Import):
        return [a.name for a in node.names if a.name.split(".")[0] == PKG]
    if node.level:
        base = name.split(".") if is_pkg else name.split(".")[:-1]
        module = ".".join(base[: len(base) - node.level + 1] + ([node.module] if node.module else []))
    else:
        module = node.module or ""
    if module.split(".")[0] != PKG:
        return []
    return [f"{module}.{a.name}" if f"{module}.{a.name}" in mods else module for a in node.names]


def import_graph(lazy: bool = False) -> dict[str, set[str]]:
    """module -> modules it imports at module level (with ``lazy``: also inside functions). Importing
    ``a.b.c`` from outside package ``a.b`` runs ``a/b/__init__.py`` first: that is an edge too."""
    mods, graph = modules(), {}
    for name, (path, is_pkg) in mods.items():
        tree = ast.parse(path.read_text())
        nodes = tree.body if not lazy else ast.walk(tree)
        if not lazy:  # module level includes imports under if/try at the top, not inside def/class
            nodes = [n for top in tree.body if not isinstance(top, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
                     for n in ast.walk(top)]
        edges = set()
        for node in nodes:
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                for target in _targets(mods, name, is_pkg, node):
                    parts = target.split(".")
                    own = name if is_pkg else name.rpartition(".")[0]
                    for k in range(2, len(parts) + 1):  # the target and every package above it not above us
                        step = ".".join(parts[:k])
                        if step in mods and step != name and not (own == step or own.startswith(step + ".")):
                            edges.add(step)
        graph[name] = edges
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, found, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_import_cycles_at_module_level():
    found = cycles(import_graph())
    assert not found, "import cycles:\n" + "\n".join(" <-> ".join(c) for c in found)


def test_no_import_cycles_counting_lazy_imports():
    found = cycles(import_graph(lazy=True))
    assert not found, "import cycles through in-function imports:\n" + "\n".join(" <-> ".join(c) for c in found)


def test_the_cycle_check_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_root_holds_only_the_api_and_the_contracts():
    root = sorted(p.stem for p in (SRC / PKG).glob("*.py"))
    assert root == ["__init__", "__main__", "_compat", "config", "errors", "telemetry"]


OLD_PATHS_PROBE = """
import importlib, json, warnings
from streamedit import _compat
out = {}
for old, homes in sorted(_compat.MOVED.items()):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        module = importlib.import_module(old)
    same = module is importlib.import_module(homes[0]) if len(homes) == 1 else bool(dir(module))
    out[old] = [same, [str(w.message) for w in caught if issubclass(w.category, DeprecationWarning)]]
print(json.dumps(out))
"""


def test_old_module_paths_still_import_with_a_deprecation():
    """A fresh interpreter (the warning comes at an old path's first import): every old path imports, warns
    once naming its new home, and is the new module itself when it moved whole."""
    res = subprocess.run([sys.executable, "-c", OLD_PATHS_PROBE], capture_output=True, text=True,
                         env={"PYTHONPATH": str(SRC)}, timeout=300)
    assert res.returncode == 0, res.stderr
    results = json.loads(res.stdout.strip().splitlines()[-1])
    moved = importlib.import_module("streamedit._compat").MOVED
    assert sorted(results) == sorted(moved)
    for old, (same, warned) in results.items():
        assert same, old
        assert len(warned) == 1 and moved[old][0] in warned[0] and "the old path goes in" in warned[0], (old, warned)


def test_old_names_resolve_in_their_new_homes():
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        import streamedit.lllite as lllite
        from streamedit.engine_config import attach_adapter, to_working  # split over three modules

        from streamedit.engine import EngineConfig, StreamEngine  # package now, re-exports the old module's names
        from streamedit.models import hook_sites, load_models
    from streamedit.temporal import attach, hooks
    from streamedit.temporal.adapter import LLLiteAdapter
    assert attach_adapter is attach.attach_adapter and hook_sites is hooks.hook_sites
    assert lllite.LLLiteAdapter is LLLiteAdapter and lllite.select_hooks is hooks.select_hooks
    assert callable(to_working) and callable(load_models) and EngineConfig.__module__ == "streamedit.config"
    assert StreamEngine.__module__ == "streamedit.engine.stream"
