#!/usr/bin/env bash
# One device call's command, run in the repository root on the GPU machine (`run` with carry [".gpu"]; the demo
# weights deleted from the working tree for the call). .gpu/site.tar.xz: `scripts/gpu-site.sh --serve` for
# `serve`, `--ray` for `ray`, either for `host`; .gpu/clips/goat.mp4: a clip (a DAVIS one, not committed).
#
#   NAME=j RUNS="4x30x60 5x24x30" LIMIT=575 [KEEP=1] scripts/gpu_call.sh serve   # issue 25: serve under load
#   SECONDS_LONG=120 SHARD=600 scripts/gpu_call.sh ray     # issue 27: stylize --ray against plain stylize
#   scripts/gpu_call.sh host                               # no model: refresh flow under GIL load, file path I/O
#   NAME=r RUNS="1x30x60 4x30x60" scripts/gpu_call.sh ray-serve   # issue 27: the same load through `serve --ray`
#
# `ray-serve` is the second call on the machine a `serve` call left warm: Ray Serve's packages do not fit one call
# beside the serve site, so that call unpacked .gpu/site.tar.xz (`--serve`) into /tmp/site and this one carries
# only .gpu/site-extra.tar.xz (`scripts/gpu-site.sh --ray-serve-extra`, 33 MB) and unpacks it over it. It stops the
# kept plain server and starts `serve --ray local --replicas 1` with the same flags, so the replica loads the
# functions that server compiled (its .cache/streamedit stays on the machine) instead of compiling for minutes.
#
# Each mode first prints the GPU, cores and package versions, and runs scripts/flow_probe.py (serve: only when
# no kept server is up, so the probe does not run beside it). Results go under $OUT.
set -uo pipefail
mode=${1:?serve, ray, ray-serve or host}
[ -f .gpu/site.tar.xz ] && tar xJf .gpu/site.tar.xz -C /tmp
[ -f .gpu/site-extra.tar.xz ] && tar xJf .gpu/site-extra.tar.xz -C /tmp
export PYTHONPATH=/tmp/site:$PWD/src
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader; nproc
python -c "import torch,transformers,diffusers,av,cv2;print(torch.__version__,transformers.__version__,diffusers.__version__,av.__version__,cv2.__version__)"
probe() { timeout 120 python scripts/flow_probe.py > "$OUT/flow-probe$1.json" 2>&1; tail -c 1500 "$OUT/flow-probe$1.json"; }
case $mode in
  serve)
    python -c "import urllib.request as u;u.urlopen('http://127.0.0.1:${PORT:-7860}/health',timeout=2)" 2>/dev/null \
      || probe "-${NAME:?}"
    OUT=$OUT/$NAME TAR=1 KEEP=${KEEP:-1} STACKS=${STACKS:-0} RUNS="${RUNS:?}" LIMIT=${LIMIT:-555} \
      scripts/gpu_serve_load.sh --max-batch 4 ${SERVE_ARGS:-}
    # how big the compiled functions are: whether a later session could carry them instead of compiling ~455 s
    du -sh .cache/streamedit/* 2>/dev/null ;;
  ray)
    probe ""
    SECONDS_LONG=${SECONDS_LONG:-120} SHARD=${SHARD:-600} timeout "${LIMIT:-560}" \
      scripts/gpu_ray_stylize.sh .gpu/clips/goat.mp4 "$OUT/ray"
    cat "$OUT/ray/summary.txt" ;;
  host)
    probe ""
    python scripts/make_1080p_clip.py .gpu/clips/goat.mp4 /tmp/g512.mp4 --seconds 20 --width 512 --height 512
    timeout 60 python scripts/io_speed.py /tmp/g512.mp4 --model-ms 6.66 > "$OUT/io-512.json" 2>&1
    python scripts/make_1080p_clip.py .gpu/clips/goat.mp4 /tmp/g1080.mp4 --seconds 10
    timeout 60 python scripts/io_speed.py /tmp/g1080.mp4 --model-ms 5 --encoder-preset veryfast superfast \
      > "$OUT/io-1080.json" 2>&1
    tail -n 1 "$OUT/io-512.json" "$OUT/io-1080.json" ;;
  ray-serve)
    python -c "import aiortc, fastapi, ray.serve" 2>/dev/null \
      || { echo "ray-serve needs /tmp/site from a serve call on this machine and .gpu/site-extra.tar.xz"; exit 2; }
    for f in server smi; do [ -f .cache/serve-load/$f.pid ] && kill -INT "$(cat .cache/serve-load/$f.pid)" 2>/dev/null; done
    sleep 8
    OUT=$OUT/${NAME:?} TAR=1 KEEP=0 STACKS=0 RUNS="${RUNS:?}" LIMIT=${LIMIT:-555} \
      scripts/gpu_serve_load.sh --max-batch 4 --ray local --replicas 1 ${SERVE_ARGS:-} ;;
  *) echo "unknown mode $mode (serve, ray, ray-serve or host)"; exit 2 ;;
esac
