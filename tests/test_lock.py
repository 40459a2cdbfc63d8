"""constraints.txt (the pins `make install` and scripts/gpu-wheels.sh use) against pyproject.toml."""

import re
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
INSTALLED_EXTRAS = ("test", "eval", "serve")  # what the Makefile installs


def pins() -> dict[str, Version]:
    out = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        m = re.fullmatch(r"([A-Za-z0-9._-]+)==([^\s;#]+)", line.strip())
        assert m, f"not an exact pin: {line!r}"
        name = canonicalize_name(m[1])
        assert name not in out, f"{name} pinned twice"
        out[name] = Version(m[2])
    return out


def test_every_dependency_is_pinned_to_a_version_pyproject_allows():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = [Requirement(r) for r in project["dependencies"]]
    reqs += [Requirement(r) for extra in INSTALLED_EXTRAS for r in project["optional-dependencies"][extra]]
    locked = pins()
    for req in reqs:
        name = canonicalize_name(req.name)
        assert name in locked, f"{req.name} is not pinned in constraints.txt (run `make lock`)"
        assert req.specifier.contains(locked[name], prereleases=True), \
            f"constraints.txt pins {req.name}=={locked[name]}, outside pyproject's {req}"


def test_pins_name_no_local_build():
    # torch==2.13.0 matches the CPU and the CUDA build; +cpu would not install on the GPU machine
    assert not [f"{n}=={v}" for n, v in pins().items() if v.local]
