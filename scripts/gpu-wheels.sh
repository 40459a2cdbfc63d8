#!/usr/bin/env bash
# Fill .whl/ with Python 3.12 / manylinux x86_64 wheels of the versions constraints.txt pins, for the GPU
# machine (its image has torch 2.11 and its CUDA libraries: those are never downloaded or pinned here),
# so GPU runs use the same diffusers / transformers / av / click / ... as `make install`. Each wheel is
# fetched without its dependencies: the pins are the resolved set already.
#
#   scripts/gpu-wheels.sh                # every pin but torch's stack and the browser-test driver
#   scripts/gpu-wheels.sh kornia==0.8.1  # plus extras (name them with a version)
#   ONLY='^(aiortc|aioice)==' DEST=dir scripts/gpu-wheels.sh   # only the pins matching ONLY, into dir
#   PYVER=3.11 ...                       # wheels for another Python (a check on this machine's Python)
#
# On the GPU machine:
#   python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
#   export PYTHONPATH=/tmp/site:$PWD/src
set -euo pipefail
cd "$(dirname "$0")/.."
# torch and what only torch needs come with the image; playwright (+ greenlet) drives a browser the GPU
# machine has no use for (pyee stays: aiortc needs it too)
SKIP='^(torch|triton|nvidia-.*|cuda-.*|sympy|mpmath|networkx|jinja2|markupsafe|filelock|fsspec|setuptools|playwright|greenlet)=='
dest=${DEST:-.whl}
if [ -n "${ONLY:-}" ]; then
  mapfile -t pins < <(grep -iE "$ONLY" constraints.txt)
else
  mapfile -t pins < <(grep -v '^#' constraints.txt | grep -v '^$' | grep -viE "$SKIP")
fi
rm -rf "$dest" && mkdir -p "$dest"
python3 -m pip download -q --no-deps --only-binary=:all: --python-version "${PYVER:-3.12}" --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_26_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform any \
  -d "$dest" "${pins[@]}" "$@" 2>&1 | grep -v '^WARNING: Location' || true
got=$(ls "$dest" | wc -l)
echo "$got wheels for ${#pins[@]} pins (+ $# extras) in $dest/ ($(du -sh "$dest" | cut -f1))"
[ "$got" -ge $(( ${#pins[@]} + $# )) ] || { echo "missing wheels: see the pip messages above" >&2; exit 1; }
