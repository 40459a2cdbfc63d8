#!/usr/bin/env bash
# Pack the packages the GPU machine's image lacks into .gpu/site.tar.xz: the wheels in .whl/ (filled by
# ../shared/tools/gpu-wheels or scripts/gpu-wheels.sh) extracted into one installed tree and xz-compressed.
# Why: the working tree travels to the GPU machine with at most 64 MiB; wheels are deflate zips (av alone is
# 35 MB), and the extracted tree under xz is about 35 % smaller, which leaves room for `serve`'s WebRTC stack.
#
#   scripts/gpu-site.sh            # .whl/*.whl
#   scripts/gpu-site.sh --serve    # plus aiortc, aiohttp and their dependencies at the constraints.txt pins
#
# Then `run` with carry [".gpu"] and start the command with
#   tar xJf .gpu/site.tar.xz -C /tmp && export PYTHONPATH=/tmp/site:$PWD/src
# (the tracked demo weights, 32 MB, must not travel too: see docs/benchmarks.md "Running on the GPU machine").
set -euo pipefail
cd "$(dirname "$0")/.."
extra=()
if [ "${1:-}" = --serve ]; then
  SERVE='^(aiortc|aioice|aiohttp|aiohappyeyeballs|aiosignal|attrs|frozenlist|multidict|propcache|yarl|pyee|pylibsrtp|google-crc32c|cryptography|pyopenssl|dnspython|ifaddr|cffi|pycparser)=='
  ONLY=$SERVE DEST=.gpu/serve-wheels scripts/gpu-wheels.sh
  extra=(.gpu/serve-wheels/*.whl)
fi
tmp=$(mktemp -d) && trap 'rm -rf "$tmp"' EXIT
for w in .whl/*.whl "${extra[@]}"; do python3 -m zipfile -e "$w" "$tmp/site/"; done
# a wheel's NAME.data/{purelib,platlib} belong in site-packages itself (what pip's installer does)
for d in "$tmp"/site/*.data; do
  [ -d "$d" ] || continue
  for sub in purelib platlib; do [ -d "$d/$sub" ] && cp -r "$d/$sub/." "$tmp/site/"; done
  rm -rf "$d"
done
mkdir -p .gpu && tar cf - -C "$tmp" site | xz -T0 -6 > .gpu/site.tar.xz
echo ".gpu/site.tar.xz: $(du -h .gpu/site.tar.xz | cut -f1) from $(ls .whl/*.whl "${extra[@]}" | wc -l) wheels"
