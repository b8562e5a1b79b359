#!/usr/bin/env bash
# The soak of issue 6: a release ssehub on 127.0.0.1, `ssehub bench --soak` against it (30
# minutes of clients coming and going), the samples in bench/results/soak.json, then
# docs/BENCHMARKS.md and docs/soak.svg regenerated. Not part of CI.
#
#   bench/soak.sh                                   # 30 minutes, the defaults of --soak
#   DURATION=5m bench/soak.sh --subscribers 500     # further flags go to ssehub bench
#   NAME=soak-batching SSEHUB_FLAGS="--write-budget 1000" bench/soak.sh
#                                                   # flags for the hub; its own results file
set -euo pipefail
cd "$(dirname "$0")/.."

DURATION=${DURATION:-30m}
PORT=${PORT:-8000}
RESULTS=${RESULTS:-bench/results}
NAME=${NAME:-soak}
SECRET=bench-secret-not-for-production
SSEHUB=target/release/ssehub
LOG=$(mktemp /tmp/ssehub-soak.XXXXXX.log)

log() { echo "==> $*" >&2; }

log "building ssehub (release)"
cargo build --release --quiet
ulimit -n 20000 2>/dev/null || true

# shellcheck disable=SC2086 # SSEHUB_FLAGS: extra serve flags, split on spaces
RUST_LOG=warn "$SSEHUB" serve --listen "127.0.0.1:$PORT" --publisher-jwt-key "$SECRET" \
  --clock-interval 0 --max-connections 19800 ${SSEHUB_FLAGS:-} >"$LOG" 2>&1 &
HUB=$!
trap 'kill "$HUB" 2>/dev/null || true' EXIT
for _ in $(seq 1 200); do
  if (exec 3<>"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null; then break; fi
  sleep 0.05
done
if ! kill -0 "$HUB" 2>/dev/null; then
  echo "ssehub did not start (is port $PORT taken? set PORT): $(tail -1 "$LOG")" >&2
  exit 1
fi

log "soak of $DURATION against ssehub (pid $HUB); hub log in $LOG"
mkdir -p "$RESULTS"
"$SSEHUB" bench --soak "$DURATION" --hub "http://127.0.0.1:$PORT/.well-known/mercure" \
  --pid "$HUB" --jwt-key "$SECRET" --json "$@" >"$RESULTS/$NAME.json.tmp"
mv "$RESULTS/$NAME.json.tmp" "$RESULTS/$NAME.json"
# The hub's own counters at the end (writes by kind, drops by reason), beside the samples.
curl -fsS "http://127.0.0.1:$PORT/metrics" >"$RESULTS/$NAME-metrics.txt" 2>/dev/null || true
kill "$HUB"
wait "$HUB" 2>/dev/null || true

log "writing docs/BENCHMARKS.md and docs/soak.svg"
python3 bench/summarize.py "$RESULTS" >docs/BENCHMARKS.md.new
mv docs/BENCHMARKS.md.new docs/BENCHMARKS.md
log "done: $RESULTS/$NAME.json, docs/BENCHMARKS.md#soak"
