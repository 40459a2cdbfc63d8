#!/usr/bin/env bash
# Issue 27's single-GPU file numbers in one GPU call: `stylize --ray` (one shard task per GPU, on a local Ray
# instance) against plain `stylize` on one long clip, both with the real-size model (random:real, bf16).
#   1. plain `stylize --preset exact` (compiles on a cold cache, fills it), 2. plain with default flags (warm),
#   3. `--ray local --shard-frames SHARD` (warm cache: each shard loads its compiled functions from it).
# Ray comes in .gpu/site.tar.xz built by `scripts/gpu-site.sh --ray`.
#
#   SECONDS_LONG=120 SHARD=600 scripts/gpu_ray_stylize.sh CLIP OUTDIR
# (MODEL and EXTRA change the model and add flags: MODEL=random:tiny EXTRA="--device cpu --size 64" on a CPU)
set -uo pipefail
clip=$1 out=$2 && mkdir -p "$out"
export STREAMEDIT_CACHE_DIR=${STREAMEDIT_CACHE_DIR:-$PWD/.cache/streamedit}
long=/tmp/long.mp4 spec=(-p "oil painting" --model "${MODEL:-random:real}" ${EXTRA:-})
python scripts/make_1080p_clip.py "$clip" "$long" --seconds "${SECONDS_LONG:-120}" --width 512 --height 512 \
  | tee "$out/clip.txt"
timed() {  # NAME ARGS...: run streamedit with ARGS, log to OUT/NAME.txt, print the wall time
  local name=$1 t0; shift; t0=$(date +%s.%N)
  python -m streamedit stylize "$long" -o "/tmp/$name.mp4" "${spec[@]}" "$@" > "$out/$name.txt" 2>&1
  echo "$name: rc=$? wall $(python -c "import sys;print(round($(date +%s.%N)-$t0,1))") s; $(tail -1 "$out/$name.txt")" \
    | tee -a "$out/summary.txt"
}
timed plain-exact --preset exact
timed plain-default
timed ray --ray local --shard-frames "${SHARD:-600}"
python - /tmp/plain-default.mp4 /tmp/ray.mp4 <<'P' | tee -a "$out/summary.txt"
import sys, av
for p in sys.argv[1:]:
    with av.open(p) as c:
        s = c.streams.video[0]
        print(p, s.frames, "frames", s.codec_context.width, "x", s.codec_context.height, [x.type for x in c.streams])
P
