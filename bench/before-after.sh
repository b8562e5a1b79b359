#!/usr/bin/env bash
# Two builds of ssehub against each other, interleaved run by run, on S1, S2, S5 and S6 (the
# arguments of bench/compare.sh): for a change that must not move performance.
#
#   git worktree add /tmp/old <commit> && (cd /tmp/old && cargo build --release)
#   BEFORE=/tmp/old/target/release/ssehub AFTER=target/release/ssehub RUNS=3 bench/before-after.sh
#
# Each run gets a fresh hub with a data directory of its own; one load generator (AFTER's
# `ssehub bench`) measures both. Raw JSON goes to $OUT, medians to stdout.
set -uo pipefail
cd "$(dirname "$0")/.."
RUNS=${RUNS:-3}
OUT=${OUT:-$(mktemp -d /tmp/ssehub-before-after.XXXXXX)}
BEFORE=${BEFORE:?give BEFORE=path/to/old/ssehub}
AFTER=${AFTER:-target/release/ssehub}
SECRET=bench-secret-not-for-production
mkdir -p "$OUT"
ulimit -n 20000 2>/dev/null || true
if (exec 3<>/dev/tcp/127.0.0.1/8000) 2>/dev/null; then
  echo "127.0.0.1:8000 is in use by another process: stop it first" >&2
  exit 1
fi
wait_port() {
  for _ in $(seq 1 200); do (exec 3<>/dev/tcp/127.0.0.1/8000) 2>/dev/null && return 0; sleep 0.05; done
  return 1
}
run() {
  local v=$1 s=$2 r=$3; shift 3
  local bin=$BEFORE data
  [ "$v" = after ] && bin=$AFTER
  data=$(mktemp -d /tmp/ssehub-ba-data.XXXXXX)
  RUST_LOG=warn "$bin" serve --listen 127.0.0.1:8000 --publisher-jwt-key "$SECRET" \
    --clock-interval 0 --max-connections 19800 --data-dir "$data" >"$OUT/$v.log" 2>&1 &
  local pid=$!
  if ! wait_port; then
    echo "$v did not start: $(tail -1 "$OUT/$v.log")" >&2
    kill "$pid" 2>/dev/null; rm -rf "$data"; return
  fi
  echo "==> $s $v run $r" >&2
  "$AFTER" bench --target ssehub --jwt-key "$SECRET" --pid "$pid" --label "$s" --json "$@" \
    >"$OUT/$s-$v-$r.json" 2>>"$OUT/bench.err" || echo "bench failed: $s $v $r" >&2
  kill "$pid" 2>/dev/null; wait "$pid" 2>/dev/null; rm -rf "$data"; sleep 0.5
}
for r in $(seq 1 "$RUNS"); do
  for v in before after; do
    run $v S1 "$r" --subscribers 1000 --updates 2000 --rate 200 --size 100 --publishers 16
    run $v S2 "$r" --subscribers 10000 --updates 300 --rate 20 --size 100 --publishers 16 \
      --source-ips 8 --connect-concurrency 500
    run $v S5 "$r" --subscribers 19000 --updates 1 --rate 1 --size 100 --source-ips 8 \
      --connect-concurrency 500 --settle 3s
    run $v S6 "$r" --subscribers 10000 --topics 1000 --updates 2000 --rate 200 --publishers 16 \
      --size 100 --source-ips 8 --connect-concurrency 500
  done
done
python3 - "$OUT" <<'PY'
import glob, json, os, statistics, sys
rows = {}
for f in sorted(glob.glob(os.path.join(sys.argv[1], "*.json"))):
    s, v, _ = os.path.basename(f)[:-5].split("-")
    try:
        rows.setdefault((s, v), []).append(json.load(open(f)))
    except ValueError:
        print(f"unreadable: {f}", file=sys.stderr)
print("| scenario | build | deliveries / CPU-s | memory / subscriber (KiB) | p99 (ms) | lost | duplicates |")
print("|---|---|---|---|---|---|---|")
for s in ["S1", "S2", "S5", "S6"]:
    for v in ["before", "after"]:
        ds = rows.get((s, v), [])
        if not ds:
            continue
        med = lambda xs: statistics.median(xs)
        dpc = [d["server"]["deliveries_per_cpu_sec"] for d in ds]
        rss = [d["server"]["rss_per_subscriber_kib"] for d in ds]
        p99 = [d["latency_ms"]["p99"] for d in ds]
        print(f"| {s} | {v} | {med(dpc) / 1000:.0f}k ({', '.join(f'{x / 1000:.0f}k' for x in dpc)}) "
              f"| {med(rss):.2f} | {med(p99):.1f} | {sum(d['lost'] for d in ds)} "
              f"| {sum(d['duplicates'] for d in ds)} |")
PY
echo "raw JSON: $OUT" >&2
