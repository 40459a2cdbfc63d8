#!/usr/bin/env bash
# Train the bundled demo model and its temporal adapter on the GPU machine (see docs/demo-model.md).
# Usage: scripts/gpu_train_demo.sh base|adapter|pairs|lllite|protocol CLIPS_DIR OUT_DIR
# `base` trains the edit model into OUT_DIR/demo-model (and /tmp/demo-model); `adapter` makes teacher pairs
# from $MODEL (default /tmp/demo-model) and trains the LLLite adapter into OUT_DIR/demo-lllite.safetensors;
# and bakes MULTIPLIER (default 1.35) into it (scripts/bake_lllite_multiplier.py; the unbaked file stays as
# demo-lllite-m1.safetensors); with EVAL=1 it also runs `streamedit eval` on the held-out clip (blackswan)
# per style, without and with it (eval.tgz; this does not fit one 10-minute call after the training, so
# the bundled adapter's eval ran on a CPU with the same commands).
# Defaults: the bundled recipe (docs/demo-model.md). The bundled base model is one `base` run plus eight
# continued runs, each from the previous one's OUT/demo-model:
#   INIT_FROM=... UNET_MINUTES=6.2 LR=4e-4 SEED=1
#   INIT_FROM=... UNET_MINUTES=6.0 LR=4e-4 SEED=2 STRENGTH=0.03
#   INIT_FROM=... UNET_MINUTES=6.0 LR=3e-4 SEED=3 STRENGTH=0.015
#   INIT_FROM=... UNET_MINUTES=6.4 LR=3e-4 SEED=4 STRENGTH=0.015 BASE_PIXEL_WEIGHT=100 ONE_STEP=0.9
#   INIT_FROM=... UNET_MINUTES=5.9 LR=3e-4 SEED=5 STRENGTH=0.015 BASE_PIXEL_WEIGHT=100 ONE_STEP=0.9
#   INIT_FROM=... UNET_STEPS=0 SEED=6 STRENGTH=0.015 BASE_PIXEL_WEIGHT=100 DECODER_BLOCKS=4,4,2,0 DECODER_STEPS=6000
#   INIT_FROM=... UNET_MINUTES=5.0 LR=3e-4 SEED=7 STRENGTH=0.015 BASE_PIXEL_WEIGHT=100 ONE_STEP=0.9 JOINT_DECODER=1 DECODER_STEPS=2500
#   INIT_FROM=... UNET_MINUTES=5.0 LR=3e-4 SEED=8 STRENGTH=0.015 BASE_PIXEL_WEIGHT=100 ONE_STEP=0.9 JOINT_DECODER=1 DECODER_STEPS=2500
# (6.4 minutes leaves the archive step past a 10-minute call: 5.9 fits.) BASE_PIXEL_WEIGHT is `train base
# --pixel-weight`, ONE_STEP its --one-step-fraction; MLP_DIM / COND_DIM size the adapter (default 64 / 32).
# PIXEL_WEIGHT keeps the image loss's share: the velocity loss grows as the start sigma shrinks (first-step
# latent loss ~3.6 at strength 0.08, ~64 at 0.015), so 100 for a 0.08 model, 1800 for the bundled 0.015 one.
# INIT_FROM=MODEL_DIR continues training a saved model (no VAE stage; LR and SEED set its learning rate and
# crop/noise seed). Adapter runs keep their pairs in $PAIRS (default /tmp/pairs-<name of OUT_DIR>), so
# several can run side by side on one GPU (two at once: each step ~15 % slower, so 1400 steps no longer fit one call).
# Issue 29 (generalisation): `pairs` and `lllite` are the two halves of `adapter`, for one 10-minute call each
# on a warm machine (the pairs stay in $PAIRS); SYNTHETIC=N adds N generated clips (SYNTHETIC_SEED, 48 frames)
# to the pairs; STALE_COND=R, AUGMENT=1, FLOW=backward|forward and RUNTIME_BATCH set `train lllite`'s
# --stale-cond / --augment / --flow / --runtime-batch; RESUME=FILE continues an `lllite` run that a call's time cut
# short, from a checkpoint it wrote (OUT_DIR/demo-lllite-m1-step000500.safetensors: --save-every 500), to the same
# result as one unbroken run (`train lllite --resume`). `protocol` runs `streamedit eval protocol` on the test
# set for ADAPTER (default OUT_DIR/demo-lllite.safetensors; `demo` = the bundled one) into OUT_DIR/protocol-NAME,
# or, with TUNE=1, only on the tune clip (blackswan), once per multiplier in MULTIPLIERS (e.g. "1.0 1.2 1.4").
set -euo pipefail
stage=$1 clips=$2 out=$3
se() { python3 -m streamedit "$@"; }
mkdir -p "$out"
case $stage in
base)
  se train base --clips "$clips" --holdout blackswan -o "$out/demo-model" --device cuda \
    --vae-steps "${VAE_STEPS:-3000}" --crops "${CROPS:-8}" --unet-steps "${UNET_STEPS:-20000}" --unet-minutes "${UNET_MINUTES:-3.8}" --batch "${BATCH:-128}" \
    --strength "${STRENGTH:-0.08}" --decoder-steps "${DECODER_STEPS:-1500}" --lr "${LR:-6e-4}" --seed "${SEED:-0}" \
    --pixel-weight "${BASE_PIXEL_WEIGHT:-0.5}" --one-step-fraction "${ONE_STEP:-0.75}" \
    ${INIT_FROM:+--init-from "$INIT_FROM"} ${DECODER_CHANNELS:+--decoder-channels "$DECODER_CHANNELS"} \
    ${DECODER_BLOCKS:+--decoder-blocks "$DECODER_BLOCKS"} ${JOINT_DECODER:+--joint-decoder} 2> "$out/base.log"
  tail -c 600 "$out/base.log" | tr '\r' '\n' | tail -3
  rm -rf /tmp/demo-model && cp -r "$out/demo-model" /tmp/demo-model  # for `adapter` on the same (warm) machine
  # files come back in pieces of at most 16 MiB
  tar czf - -C "$out" demo-model | split -b 15M - "$out/demo-model.tgz.part-"
  rm -rf "$out/demo-model/unet" "$out/demo-model/vae" "$out/demo-model/text_encoder" "$out/demo-model/tokenizer" ;;
protocol)
  adapter=${ADAPTER:-$out/demo-lllite.safetensors} name=${NAME:-$(basename "${ADAPTER:-new}" .safetensors)}
  if [ "${TUNE:-0}" = 1 ]; then  # the tune clip only: settings are chosen without looking at the test set
    for m in ${MULTIPLIERS:-1.0}; do
      se eval protocol --set tune --clips-dir "$clips" --model "${MODEL:-demo}" --lllite "$adapter" --device cuda \
         --dtype "${DTYPE:-float32}" --lllite-multiplier "$m" --clips 1 --frames 50 --out "$out/tune-$name-m$m" \
         2> "$out/tune-$name-m$m.log"
      grep -A 8 "Cond refresh 8" "$out/tune-$name-m$m/report.md"
    done
    exit 0
  fi
  se eval protocol --model "${MODEL:-demo}" --lllite "$adapter" --device cuda --dtype "${DTYPE:-float32}" \
     --clips "${TEST_CLIPS:-8}" --frames "${FRAMES:-48}" --cut-clips "${CUT_CLIPS:-4}" --out "$out/protocol-$name" \
     2> "$out/protocol-$name.log"
  grep -v "^| synth" "$out/protocol-$name/report.md" | tail -n 40 ;;
adapter|pairs|lllite)
  styles=(-p "oil painting" -p watercolor -p "pencil sketch" -p cartoon)
  model=${MODEL:-/tmp/demo-model} pairs=${PAIRS:-/tmp/pairs-$(basename "$out")}
  [ "$stage" = lllite ] || se train pairs --model "$model" --clips "$clips" --exclude blackswan "${styles[@]}" -o "$pairs" \
     --size 256 --dtype float32 --alpha "${ALPHA:-0.5}" --synthetic "${SYNTHETIC:-0}" --synthetic-seed "${SYNTHETIC_SEED:-0}" \
     2> "$out/pairs.log"
  [ "$stage" = pairs ] && { tail -c 300 "$out/pairs.log" | tr '\r' '\n' | tail -2; exit 0; }
  se train lllite --model "$model" --pairs "$pairs" -o "$out/demo-lllite-m1.safetensors" --dtype float32 \
     --steps "${LLLITE_STEPS:-1400}" --hooks "${HOOKS:-all}" --p-one "${P_ONE:-1.0}" --batch 16 --lr 5e-4 --warmup 100 --fixed-noise --save-every 500 \
     --pixel-weight "${PIXEL_WEIGHT:-1800}" --mlp-dim "${MLP_DIM:-64}" --cond-emb-dim "${COND_DIM:-32}" --log "$out/lllite_log.jsonl" \
     --stale-cond "${STALE_COND:-0}" --runtime-batch "${RUNTIME_BATCH:-4}" --flow "${FLOW:-backward}" ${AUGMENT:+--augment} \
     ${RESUME:+--resume "$RESUME"} 2> "$out/lllite.log"
  tail -c 600 "$out/lllite.log" | tr '\r' '\n' | tail -3
  python3 "$(dirname "$0")/bake_lllite_multiplier.py" "$out/demo-lllite-m1.safetensors" "$out/demo-lllite.safetensors" \
    "${MULTIPLIER:-1.35}" --model "$model"
  [ "${EVAL:-0}" = 1 ] || exit 0
  ev=/tmp/eval-$(basename "$out") && rm -rf "$ev" && mkdir -p "$ev"
  for i in 1 3 5 7; do
    style=${styles[$i]} slug=${styles[$i]// /-}
    for run in none lllite; do
      extra=() && [ $run = lllite ] && extra=(--lllite "$out/demo-lllite.safetensors" --cond-refresh 1)
      se eval --clips "$clips/blackswan.mp4" -p "$style" --out "$ev/$slug-$run" --model "$model" --device cuda \
         --dtype float32 --size 256 --batch 4 --fixed-noise --save-videos "${extra[@]}" > "$ev/$slug-$run.txt" 2>&1 || echo "eval $slug-$run failed"
    done
  done
  cp "$out"/*.log "$out/lllite_log.jsonl" $ev/ && rm -f "$out"/*.log "$out/lllite_log.jsonl"
  tar czf "$out/eval.tgz" -C /tmp "$(basename "$ev")"
  for f in $ev/*-none.txt $ev/*-lllite.txt; do echo "== $f"; tail -4 "$f"; done ;;
esac
