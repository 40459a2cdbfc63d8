#!/usr/bin/env bash
# Issue 25's load runs in one GPU call: one `streamedit serve` (random:real, bf16, 512², the 38-hook random
# adapter, cond refresh 8) started once, then the load generator against it several times with --url, so the
# cold compile and capture (388 s for the four batch buckets on an H100, 2026-12-06) is paid once per machine.
# GPU memory is sampled every 2 s for the whole call; /stats is saved after each run.
#
#   RUNS="1x30x60 4x30x60 6x24x30" LIMIT=580 scripts/gpu_serve_load.sh [more serve args]
#
# RUNS: SESSIONSxFPSxSECONDS, in order; a run that no longer fits LIMIT seconds (from the start) is skipped.
# echoSESSIONSxFPSxSECONDS: the media path alone (scripts/serve_transport.py: no model, 512x384), the floor of e2e.
# TAR=1 packs $OUT into $OUT.tgz at the end (the device tool returns only a few files per call).
# STACKS=1 starts the server under scripts/stack_sample.py: its threads' stacks sampled (STACK_SAMPLE_MS, default 5),
# saved after each run as stacks-RUN.json (cumulative; scripts/stack_report.py AFTER BEFORE shows one run's).
# KEEP=1 leaves the server (and the memory sampling) running detached after the call, and a later call on the
# same warm machine finds it on PORT and reuses it (no second start-up); without KEEP the server is stopped.
# MODEL, LLLITE, DEVICE, DTYPE (default random:real, random, cuda, bfloat16) set the server's model; later args
# override the fixed ones (e.g. `--ray local --replicas 1`, or `--size 128` for a check on a CPU); SIZE (512): what
# the load generator's sessions send and ask for.
# Writes into $OUT (default out/serve-load): server.log, gpumem.csv (the server's whole life so far),
# load-*.json/.txt, stats-*.json.
set -uo pipefail
OUT=${OUT:-out/serve-load} && mkdir -p "$OUT"
export STREAMEDIT_CACHE_DIR=${STREAMEDIT_CACHE_DIR:-$PWD/.cache/streamedit}
LIVE=$PWD/.cache/serve-load && mkdir -p "$LIVE"  # outlives the call: the kept server's log, pids, memory trace
T0=$(date +%s); el() { echo $(( $(date +%s) - T0 )); }
TOKEN=${TOKEN:-loadtest} PORT=${PORT:-7860}
get() { python -c "import sys,urllib.request as u;sys.stdout.write(u.urlopen(sys.argv[1],timeout=5).read().decode())" "$1"; }
stop() { kill -INT "$(cat "$LIVE/server.pid")" 2>/dev/null; sleep 5; kill "$(cat "$LIVE/smi.pid")" 2>/dev/null; }
finish() {
  cp "$LIVE/server.log" "$LIVE/gpumem.csv" "$OUT/" 2>/dev/null; [ "${KEEP:-0}" = 1 ] || stop
  [ "${TAR:-0}" = 1 ] && tar czf "$OUT.tgz" -C "$(dirname "$OUT")" "$(basename "$OUT")" && rm -rf "$OUT"
}
if get "http://127.0.0.1:$PORT/health" > /dev/null 2>&1; then
  echo "reusing the server already up on port $PORT (started by an earlier call)"
else
  # STACKS=1: the server under scripts/stack_sample.py (its threads' stacks sampled; stacks-RUN.json per run)
  RUNNER=(python -m streamedit); [ "${STACKS:-0}" = 1 ] && RUNNER=(python scripts/stack_sample.py "$LIVE/stacks.json" -m streamedit)
  setsid nohup "${RUNNER[@]}" serve --model "${MODEL:-random:real}" --device "${DEVICE:-cuda}" --dtype "${DTYPE:-bfloat16}" \
    --lllite "${LLLITE:-random}" --size 512 --max-size 512 --prepare-input 512x512 \
    --max-sessions "${MAX_SESSIONS:-12}" --host 127.0.0.1 --ice-host 127.0.0.1 --port "$PORT" --token "$TOKEN" "$@" \
    > "$LIVE/server.log" 2>&1 < /dev/null &
  echo $! > "$LIVE/server.pid"
  setsid nohup nvidia-smi --query-gpu=timestamp,memory.used,utilization.gpu --format=csv,noheader -l 2 \
    > "$LIVE/gpumem.csv" 2>/dev/null < /dev/null &
  echo $! > "$LIVE/smi.pid"
fi
SP=$(cat "$LIVE/server.pid")
trap finish EXIT
until get "http://127.0.0.1:$PORT/health" > /dev/null 2>&1; do
  kill -0 "$SP" 2>/dev/null || { echo "the server exited:"; tail -5 "$LIVE/server.log"; exit 1; }
  [ "$(el)" -lt "${LIMIT:-580}" ] || { echo "the server was not up in time"; exit 1; }
  sleep 1
done
echo "server up at $(el) s"; grep -E "^(engine|compiled|loaded|built)" "$LIVE/server.log"
for r in ${RUNS:-1x30x60 4x30x60 6x24x30 8x24x30}; do
  IFS=x read -r n fps s <<< "${r#echo}"
  left=$(( ${LIMIT:-580} - $(el) ))
  [ $left -ge $(( s + 40 )) ] || { echo "skip $r (${left} s left)"; continue; }
  if [ "${r#echo}" != "$r" ]; then  # the media path alone (no model: scripts/serve_transport.py) on this host
    timeout $left python scripts/serve_transport.py --sessions "$n" --fps "$fps" --seconds "$s" --size 512 \
      --json "$OUT/transport-${r#echo}.json" > "$OUT/transport-${r#echo}.txt" 2>&1
    echo "== $r: rc=$? at $(el) s"; grep -v -i warning "$OUT/transport-${r#echo}.txt" | tail -$(( n + 4 ))
    continue
  fi
  timeout $left python -m streamedit.serve.bench --url "http://127.0.0.1:$PORT/?token=$TOKEN" --size "${SIZE:-512}" \
    --input "${SIZE:-512}x${SIZE:-512}" --warmup 10 --sessions "$n" --fps "$fps" --seconds "$s" --json "$OUT/load-$r.json" \
    > "$OUT/load-$r.txt" 2>&1
  echo "== $r: rc=$? at $(el) s"; grep -v -i warning "$OUT/load-$r.txt" | tail -$(( n + 4 ))
  get "http://127.0.0.1:$PORT/stats?token=$TOKEN" > "$OUT/stats-$r.json" 2>/dev/null
  [ "${STACKS:-0}" = 1 ] && { sleep 6; cp "$LIVE/stacks.json" "$OUT/stacks-$r.json"; }  # cumulative: diff runs
  python - "$OUT/stats-$r.json" <<'P'  # the engine's last ticks: rows, host launch by part, hand-out (multistats)
import json, sys
try:
    e = json.load(open(sys.argv[1]))["engine"]
except (OSError, ValueError, KeyError):
    sys.exit()
print("   histogram", e.get("histogram"), "busy", round(e.get("busy_share_recent", 0), 3), "ticks", json.dumps(e.get("ticks")))
P
done
python - "$LIVE/gpumem.csv" <<'P'
import sys
mem = [int(l.split(", ")[1].split()[0]) for l in open(sys.argv[1]) if "MiB" in l]
if mem:
    print(f"GPU memory used (MiB), {len(mem)} samples: max {max(mem)}, last {mem[-1]}")
P
echo "total $(el) s"
