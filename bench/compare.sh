#!/usr/bin/env bash
# Runs the scenarios of PERFORMANCE.md (S1-S7) against ssehub, the naive axum + broadcast
# baseline (bench/baseline) and nginx + nchan, back to back on 127.0.0.1, RUNS times each,
# and writes the raw JSON to bench/results/ and the medians to docs/BENCHMARKS.md.
#
#   bench/compare.sh                      # everything, twice
#   RUNS=3 PEERS="ssehub baseline" SCENARIOS="S1 S3" bench/compare.sh
#   PEERS="ssehub ssehub_memory" SCENARIOS="S1 S3" bench/compare.sh   # the durable history's cost
#
# Peers: ssehub (at its defaults: durable history on, each run in a fresh data directory),
# ssehub_memory (the same binary with `--data-dir none`: the history in memory only), the
# baseline and nchan. ssehub_memory runs only when named in PEERS.
#
# S7 (ssehub only: three nodes on one Redis against one node) needs redis-server; SCALE (ssehub
# only) runs the S2 shape at 1,000, 5,000, 10,000 and 19,000 subscribers.
#
# Production-shaped scenarios, run only when named (SCENARIOS="S1-tls S1-h2 S5-tls S5-h2"): every
# peer serves TLS with one self-signed certificate made here (ssehub --tls-cert, nginx
# `listen ssl http2`, the baseline's rustls accept loop), and the bench subscribes over TLS:
#   S1-tls   S1 over TLS, HTTP/1.1
#   S1-h2    S1 over TLS, HTTP/2, 10 streams per connection
#   S5-tls   idle memory, TLS HTTP/1.1 (TLS_IDLE subscribers, 2,000)
#   S5-h2    idle memory, HTTP/2: 10 streams per connection (TLS_IDLE streams), and as
#            S5-h2-single one stream per connection (half as many)
# TLS_SUBSCRIBERS and TLS_UPDATES size S1-tls and S1-h2 (1,000 and 2,000, as S1).
#
# S1-light: S1 at 50 updates/s (a load the machine has room for), ssehub also at the old fixed
# budget and unbatched: run when named (SCENARIOS="S1-light").
# FRONTIER (ssehub; run with S1 so the peers are in the same batch, as SCENARIOS="S1 FRONTIER"):
# S1 at each batching setting of FRONTIER_POINTS, from none (`coalesce0`: --coalesce 0) through
# write budgets from large to small (`wbN`: --write-budget N), for the table and plot of p99
# latency against deliveries per server CPU-second (bench/frontier.py).
# PROFILE=dev runs debug builds (to try the script out; its figures mean nothing).
# PORT_OFFSET moves every port the script listens on (ssehub 8000, the S7 nodes 8001-8003, the
# baseline 3000, nchan 8090, Redis 6391, NATS 4231-4233 and 4331-4333) up by that much, so two
# batches can share a machine (their figures then disturb each other: for trying things out).
# Offsets of 200 or more, in hundreds, keep two batches' ports apart (100 would put NATS on the
# other's routes); the script refuses to start if any of its ports is taken.
#
# Each run gets a freshly started server, so its memory figures start from idle.
set -euo pipefail
cd "$(dirname "$0")/.."

RUNS=${RUNS:-2}
PEERS=${PEERS:-"ssehub baseline nchan"}
SCENARIOS=${SCENARIOS:-"S1 S2 S2-lean S3 S4 S5 S6 S7 SCALE"}
TLS_SUBSCRIBERS=${TLS_SUBSCRIBERS:-1000}
FRONTIER_POINTS=${FRONTIER_POINTS:-"coalesce0 wb400000 wb160000 wb80000 wb50000 wb35000 wb20000"}
TLS_UPDATES=${TLS_UPDATES:-2000}
TLS_IDLE=${TLS_IDLE:-2000}
PROFILE=${PROFILE:-release}
S3_RATES=${S3_RATES:-"1000 2000 5000 10000 20000 40000"}
S3_SECONDS=${S3_SECONDS:-3}
# Closed-loop publishers in S3 (each waits for its answer): 16 by default; with the durable
# history on, each waits for an fsync, so 16 of them cap the rate at 16 per commit (see
# docs/BENCHMARKS.md); S3_PUBLISHERS=64 lets commits group as a busy hub's would.
S3_PUBLISHERS=${S3_PUBLISHERS:-16}
LEAN_BOUND=${LEAN_BOUND:-250ms}
RESULTS=${RESULTS:-bench/results}
PORT_OFFSET=${PORT_OFFSET:-0}
SSEHUB_PORT=$((8000 + PORT_OFFSET))
BASELINE_PORT=$((3000 + PORT_OFFSET))
NCHAN_PORT=$((8090 + PORT_OFFSET))
SECRET=bench-secret-not-for-production
WORK=$(mktemp -d /tmp/ssehub-bench.XXXXXX)
OUT_DIR=$([ "$PROFILE" = dev ] && echo debug || echo "$PROFILE")
# SSEHUB_BINARY runs another build of ssehub as the server and the load generator (to compare
# two builds in one batch: copy one aside, e.g. `cp target/release/ssehub /tmp/ssehub-before`).
SSEHUB=${SSEHUB_BINARY:-target/$OUT_DIR/ssehub}
BASELINE=bench/baseline/target/$OUT_DIR/sse-baseline

log() { echo "==> $*" >&2; }

log "building ssehub and the baseline ($PROFILE)"
cargo build --profile "$PROFILE" --quiet
(cd bench/baseline && cargo build --profile "$PROFILE" --quiet)

# nginx + nchan from Debian, if it can be had.
# (grep reads all of apt-cache's output: `grep -q` would stop early, apt-cache would die of
# SIGPIPE, and pipefail would take a package that is there for one that is not.)
nchan_candidate() { apt-cache policy libnginx-mod-nchan 2>/dev/null | grep 'Candidate: [0-9]' >/dev/null; }
have_nchan=0
if [[ " $PEERS " == *" nchan "* ]]; then
  if ! [ -e /usr/share/nginx/modules/ngx_nchan_module.so ] && ! [ -e /usr/lib/nginx/modules/ngx_nchan_module.so ]; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
      # A fresh image has no package lists yet.
      if ! nchan_candidate; then
        apt-get update -qq >/dev/null 2>&1 || log "apt-get update failed"
      fi
      if nchan_candidate; then
        log "installing nginx and libnginx-mod-nchan"
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nginx libnginx-mod-nchan \
          >"$WORK/apt.log" 2>&1 || log "installing nginx + nchan failed: $(tail -1 "$WORK/apt.log")"
        # The package starts the system's nginx on port 80; the bench runs its own.
        if command -v systemctl >/dev/null; then systemctl stop nginx >/dev/null 2>&1 || true; fi
      fi
    else
      log "not root (or no apt-get): cannot install nginx + nchan"
    fi
  fi
  NCHAN_SO=$(ls /usr/share/nginx/modules/ngx_nchan_module.so /usr/lib/nginx/modules/ngx_nchan_module.so 2>/dev/null | head -1 || true)
  if command -v nginx >/dev/null && [ -n "$NCHAN_SO" ]; then
    have_nchan=1
  else
    log "nginx + nchan is not available here (apt-cache policy libnginx-mod-nchan): skipping that peer"
  fi
fi

ulimit -n 20000 2>/dev/null || true

# TLS for the scenarios that ask for it (tls_on / tls_off around them): one self-signed
# certificate for 127.0.0.1 that every peer serves and the bench trusts. Not a CA
# (CA:FALSE): webpki refuses a CA certificate as a server's own.
TLS=0
CERT=$WORK/tls/cert.pem
KEY=$WORK/tls/key.pem
if [[ " $SCENARIOS " == *"-tls "* ]] || [[ " $SCENARIOS " == *"-h2 "* ]]; then
  mkdir -p "$WORK/tls"
  openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 7 \
    -keyout "$KEY" -out "$CERT" -subj /CN=127.0.0.1 \
    -addext "subjectAltName=IP:127.0.0.1,DNS:localhost" \
    -addext "basicConstraints=critical,CA:FALSE" >"$WORK/openssl.log" 2>&1 \
    || { log "openssl could not make the certificate: $(tail -1 "$WORK/openssl.log")"; exit 1; }
fi

write_nginx_conf() {
  mkdir -p "$WORK/nginx/logs" "$WORK/nginx/tmp"
  # nginx before 1.25.1 turns HTTP/2 on in `listen`, as Debian 12's 1.22 needs.
  local NGINX_LISTEN="" NGINX_TLS=""
  if [ "$TLS" = 1 ]; then
    NGINX_LISTEN="ssl http2"
    NGINX_TLS="ssl_certificate $CERT; ssl_certificate_key $KEY;"
  fi
  cat >"$WORK/nginx/nginx.conf" <<CONF
load_module $NCHAN_SO;
worker_processes 2;
worker_rlimit_nofile 20000;
pid $WORK/nginx/nginx.pid;
error_log $WORK/nginx/logs/error.log warn;
daemon off;
events { worker_connections 20000; }
http {
  access_log off;
  client_body_temp_path $WORK/nginx/tmp/body;
  proxy_temp_path $WORK/nginx/tmp/proxy;
  fastcgi_temp_path $WORK/nginx/tmp/fastcgi;
  uwsgi_temp_path $WORK/nginx/tmp/uwsgi;
  scgi_temp_path $WORK/nginx/tmp/scgi;
  server {
    listen 127.0.0.1:$NCHAN_PORT $NGINX_LISTEN backlog=4096;
    $NGINX_TLS
    location ~ ^/pub/(.+)\$ {
      nchan_publisher;
      nchan_channel_id \$1;
      nchan_message_buffer_length 1000;
    }
    location ~ ^/sub/(.+)\$ {
      nchan_subscriber eventsource;
      nchan_channel_id \$1;
    }
  }
}
CONF
}

# Servers this script started, stopped whatever happens (an error, Ctrl-C).
cleanup() {
  # shellcheck disable=SC2046
  kill $(jobs -p) 2>/dev/null || true
  rm -rf "$WORK"
}
trap cleanup EXIT

# Fails when something already listens on 127.0.0.1:$1: the bench would measure that instead.
port_free() {
  if (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; then
    log "127.0.0.1:$1 is in use by another process: stop it first"
    return 1
  fi
}

wait_port() {
  for _ in $(seq 1 200); do
    if (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; then return 0; fi
    sleep 0.05
  done
  echo "nothing listens on 127.0.0.1:$1" >&2
  return 1
}

SERVER_PID=""
# Starts a peer; sets SERVER_PID (to stop) and PIDS (to measure, comma-separated). Fails
# (without ending the script) when its port is taken or it does not come up.
start_peer() {
  local port
  case $1 in
    ssehub|ssehub_memory) port=$SSEHUB_PORT ;; baseline) port=$BASELINE_PORT ;; nchan) port=$NCHAN_PORT ;;
  esac
  port_free "$port" || return 1
  case $1 in
    ssehub|ssehub_memory)
      # Each run starts with an empty durable history of its own (the default, --data-dir,
      # on), unless SSEHUB_FLAGS names one (`--data-dir none` measures it off); ssehub_memory
      # keeps its history in memory only.
      local data=()
      if [ "$1" = ssehub_memory ]; then
        data=(--data-dir none)
      elif [[ " ${SSEHUB_FLAGS:-} " != *" --data-dir "* ]]; then
        data=(--data-dir "$(mktemp -d "$WORK/data.XXXXXX")")
      fi
      # shellcheck disable=SC2086 # SSEHUB_FLAGS: extra serve flags, split on spaces
      local tls=()
      [ "$TLS" = 0 ] || tls=(--tls-cert "$CERT" --tls-key "$KEY")
      RUST_LOG=warn "$SSEHUB" serve --listen "127.0.0.1:$SSEHUB_PORT" --publisher-jwt-key "$SECRET" \
        --clock-interval 0 --max-connections 19800 "${data[@]}" "${tls[@]}" ${SSEHUB_FLAGS:-} \
        >"$WORK/ssehub.log" 2>&1 &
      SERVER_PID=$!; PIDS=$SERVER_PID; wait_port "$SSEHUB_PORT" || return 1 ;;
    baseline)
      local tls=()
      [ "$TLS" = 0 ] || tls=("$CERT" "$KEY")
      "$BASELINE" "127.0.0.1:$BASELINE_PORT" "${tls[@]}" >"$WORK/baseline.log" 2>&1 &
      SERVER_PID=$!; PIDS=$SERVER_PID; wait_port "$BASELINE_PORT" || return 1 ;;
    nchan)
      write_nginx_conf
      nginx -p "$WORK/nginx" -c "$WORK/nginx/nginx.conf" >"$WORK/nginx.log" 2>&1 &
      SERVER_PID=$!; wait_port "$NCHAN_PORT" || return 1; sleep 0.3
      PIDS=$(pgrep -P "$SERVER_PID" | paste -sd, -); PIDS="$SERVER_PID${PIDS:+,$PIDS}" ;;
  esac
}

stop_peer() {
  if [ -n "$SERVER_PID" ]; then
    kill "$SERVER_PID" 2>/dev/null || true
    wait "$SERVER_PID" 2>/dev/null || true
    SERVER_PID=""
    sleep 0.5
  fi
}

# The URL the bench talks to on PEER, over TLS or not (the same ports either way).
peer_url() {
  local scheme=http
  [ "$TLS" = 0 ] || scheme=https
  case $1 in
    ssehub|ssehub_memory) echo "$scheme://127.0.0.1:$SSEHUB_PORT/.well-known/mercure" ;;
    baseline) echo "$scheme://127.0.0.1:$BASELINE_PORT" ;;
    nchan) echo "$scheme://127.0.0.1:$NCHAN_PORT" ;;
  esac
}

# Whether PEER, as started, agrees to HTTP/2 over TLS: curl opens a subscription for a moment
# and says which protocol it got. A peer that falls back to HTTP/1.1 would make S1-h2 and S5-h2
# measure something else, so the batch says so (once per peer and scenario).
CHECKED_H2=" "
check_h2() {
  local peer=$1 scenario=$2
  [[ "$CHECKED_H2" == *" $peer-$scenario "* ]] && return 0
  CHECKED_H2+="$peer-$scenario "
  local path
  case $peer in
    ssehub|ssehub_memory) path="?topic=h2-check" ;; baseline) path="/events?topic=h2-check" ;; nchan) path="/sub/h2-check" ;;
  esac
  curl --http2 -k -sv --max-time 3 -H 'Accept: text/event-stream' -o /dev/null \
    "$(peer_url "$peer")$path" 2>"$WORK/curl.log" || true
  if grep -q '^< HTTP/2 ' "$WORK/curl.log"; then
    log "$scenario: $peer serves HTTP/2 over TLS (curl --http2 -k: $(grep -m1 '^< HTTP/2 ' "$WORK/curl.log" | tr -d '<\r'))"
  else
    log "$scenario: $peer does NOT serve HTTP/2 over TLS: $(grep -m1 -E '^< HTTP|ALPN' "$WORK/curl.log")"
  fi
}

# bench PEER SCENARIO RUN [bench flags...]: one fresh server, one bench run, its JSON kept.
bench() {
  local peer=$1 scenario=$2 run=$3; shift 3
  local out="$RESULTS/$scenario-$peer-$run.json"
  if ! start_peer "$peer"; then
    log "$scenario $peer run $run: $peer did not start (log: $(tail -1 "$WORK/$peer.log" 2>/dev/null)); skipped"
    stop_peer
    return 0
  fi
  local tls=(--hub "$(peer_url "$peer")")
  if [ "$TLS" = 1 ]; then
    tls+=(--ca "$CERT")
    check_h2 "$peer" "$scenario"
  fi
  log "$scenario $peer run $run: ${tls[*]} $*"
  if ! "$SSEHUB" bench --target "${peer%_memory}" --jwt-key "$SECRET" --pid "$PIDS" --label "$scenario" \
      --json "${tls[@]}" "$@" >"$out.tmp" 2>"$WORK/bench.err"; then
    log "bench failed: $(tail -1 "$WORK/bench.err")"
    rm -f "$out.tmp"
  else
    mv "$out.tmp" "$out"
    # ssehub's batching as it stood at the end of the run (budget, window, how busy the cores
    # were, writes by kind) and its commits' time, beside the run's JSON.
    if [[ $peer == ssehub* ]] && command -v curl >/dev/null; then
      scheme=http; [ "$TLS" = 0 ] || scheme=https
      curl -sk --max-time 2 "$scheme://127.0.0.1:$SSEHUB_PORT/metrics" \
        | grep -E '^ssehub_(write_budget|coalesce_window_seconds|cpu_busy_ratio|deliveries_total|direct_writes_total|coalesced_writes_total|task_writes_total|store_commit_seconds_sum|store_commit_seconds_count|store_updates_per_commit_sum|store_updates_per_commit_count) ' \
        >"${out%.json}.metrics" || true
    fi
  fi
  stop_peer
}

# S7: three ssehub nodes sharing one Redis, S1's load spread over them (subscribers and
# publishers round-robin), CPU summed over the nodes and Redis; against S1 on one node.
REDIS_PORT=${REDIS_PORT:-$((6391 + PORT_OFFSET))}
s7() {
  local run=$1
  if ! command -v redis-server >/dev/null; then
    log "S7 needs redis-server (apt-get install redis-server): skipped"
    return
  fi
  local s1=(--subscribers 1000 --updates 2000 --rate 200 --size 100 --publishers 16)
  bench ssehub S7-single "$run" "${s1[@]}"
  redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save '' --appendonly no \
    >"$WORK/redis.log" 2>&1 &
  local redis=$!
  wait_port "$REDIS_PORT"
  local pids=() hubs=()
  for port in $((SSEHUB_PORT + 1)) $((SSEHUB_PORT + 2)) $((SSEHUB_PORT + 3)); do
    RUST_LOG=warn "$SSEHUB" serve --listen "127.0.0.1:$port" \
      --publisher-jwt-key "$SECRET" --clock-interval 0 --redis "redis://127.0.0.1:$REDIS_PORT" \
      >"$WORK/node-$port.log" 2>&1 &
    pids+=($!)
    hubs+=("http://127.0.0.1:$port/.well-known/mercure")
  done
  for port in $((SSEHUB_PORT + 1)) $((SSEHUB_PORT + 2)) $((SSEHUB_PORT + 3)); do wait_port $port; done
  # With --write-budget auto (the default) each node batches by the machine's load, the other
  # nodes' included: nothing to wait for (a fixed budget would be shared through Redis).
  local out="$RESULTS/S7-cluster-ssehub-$run.json"
  local all_pids
  all_pids=$(IFS=,; echo "${pids[*]},$redis")
  log "S7 cluster run $run: ${s1[*]}"
  if "$SSEHUB" bench --target ssehub --hub "$(IFS=,; echo "${hubs[*]}")" --jwt-key "$SECRET" \
      --pid "$all_pids" --label S7-cluster --json "${s1[@]}" >"$out.tmp" 2>"$WORK/bench.err"; then
    mv "$out.tmp" "$out"
  else
    log "bench failed: $(tail -1 "$WORK/bench.err")"
    rm -f "$out.tmp"
  fi
  kill "${pids[@]}" "$redis" 2>/dev/null || true
  wait "${pids[@]}" "$redis" 2>/dev/null || true
  sleep 0.5
}

# S7-nats: S7 on NATS JetStream instead of Redis: three nodes on three nats-server processes
# (one cluster, stream replicas 3), CPU summed over the nodes and the three servers.
NATS_PORT=${NATS_PORT:-$((4231 + PORT_OFFSET))}
s7_nats() {
  local run=$1 nats
  nats=$(command -v nats-server || { [ -x /usr/sbin/nats-server ] && echo /usr/sbin/nats-server; } || true)
  if [ -z "$nats" ]; then
    log "S7-nats needs nats-server (apt-get install nats-server): skipped"
    return
  fi
  local s1=(--subscribers 1000 --updates 2000 --rate 200 --size 100 --publishers 16)
  local servers=() urls=() routes=() i
  for i in 0 1 2; do
    urls+=("nats://127.0.0.1:$((NATS_PORT + i))")
    routes+=("nats://127.0.0.1:$((NATS_PORT + 100 + i))")
  done
  for i in 0 1 2; do
    rm -rf "$WORK/nats-$i"
    "$nats" -js -a 127.0.0.1 -p $((NATS_PORT + i)) --server_name "n$i" --store_dir "$WORK/nats-$i" \
      --cluster_name s7 --cluster "${routes[$i]}" --routes "$(IFS=,; echo "${routes[*]}")" \
      >"$WORK/nats-$i.log" 2>&1 &
    servers+=($!)
  done
  for i in 0 1 2; do wait_port $((NATS_PORT + i)); done
  local pids=() hubs=() port
  for port in $((SSEHUB_PORT + 1)) $((SSEHUB_PORT + 2)) $((SSEHUB_PORT + 3)); do
    # The first node makes the stream once the servers have elected their JetStream leader (a
    # node waits up to 30 s for it; it accepts connections only once it holds the history).
    local deadline=$((SECONDS + 20))
    while :; do
      RUST_LOG=warn "$SSEHUB" serve --listen "127.0.0.1:$port" --publisher-jwt-key "$SECRET" \
        --clock-interval 0 --nats "$(IFS=,; echo "${urls[*]}")" --nats-replicas 3 \
        >"$WORK/node-$port.log" 2>&1 &
      local pid=$!
      if wait_port $port 2>/dev/null; then break; fi
      kill $pid 2>/dev/null || true
      if [ "$SECONDS" -ge "$deadline" ]; then
        log "S7-nats: node $port did not start: $(tail -1 "$WORK/node-$port.log")"
        kill "${pids[@]}" "${servers[@]}" 2>/dev/null || true
        return
      fi
      sleep 0.5
    done
    pids+=($pid)
    hubs+=("http://127.0.0.1:$port/.well-known/mercure")
  done
  local out="$RESULTS/S7-nats-ssehub-$run.json"
  local all_pids
  all_pids=$(IFS=,; echo "${pids[*]},${servers[*]}")
  log "S7-nats run $run: ${s1[*]}"
  if "$SSEHUB" bench --target ssehub --hub "$(IFS=,; echo "${hubs[*]}")" --jwt-key "$SECRET" \
      --pid "$all_pids" --label S7-nats --json "${s1[@]}" >"$out.tmp" 2>"$WORK/bench.err"; then
    mv "$out.tmp" "$out"
  else
    log "bench failed: $(tail -1 "$WORK/bench.err")"
    rm -f "$out.tmp"
  fi
  kill "${pids[@]}" "${servers[@]}" 2>/dev/null || true
  wait "${pids[@]}" "${servers[@]}" 2>/dev/null || true
  sleep 0.5
}

peers=()
for p in $PEERS; do
  if [ "$p" = nchan ] && [ $have_nchan = 0 ]; then continue; fi
  peers+=("$p")
done

# Results of an earlier batch must not mix into this one's medians: a scenario's files for the
# peers about to run it go first (S3 stops at the first failing rate, a failed run writes
# nothing, and RUNS may be smaller than last time).
clear_old() {
  local s=$1 p=$2
  case $s in
    S3) rm -f "$RESULTS"/S3-*-"$p"-*.json ;;
    S4) rm -f "$RESULTS"/S4-"$p"-*.json "$RESULTS"/S4-noslow-"$p"-*.json ;;
    S7) rm -f "$RESULTS"/S7-single-"$p"-*.json "$RESULTS"/S7-cluster-"$p"-*.json ;;
    S5-h2) rm -f "$RESULTS"/S5-h2-"$p"-*.json "$RESULTS"/S5-h2-single-"$p"-*.json ;;
    SCALE) rm -f "$RESULTS"/scale-*-"$p"-*.json ;;
    FRONTIER) rm -f "$RESULTS"/FRONTIER-*-"$p"-*.json ;;
    S1-light) rm -f "$RESULTS"/S1-light-*"$p"-*.json ;;
    *) rm -f "$RESULTS/$s-$p"-*.json ;;
  esac
}

# Every port the batch may listen on must be free before it starts: another batch's server on
# one of them (two batches with PORT_OFFSETs too close) would be measured instead, as waiting
# for a port only sees that something answers there.
busy=0
for port in "$SSEHUB_PORT" $((SSEHUB_PORT + 1)) $((SSEHUB_PORT + 2)) $((SSEHUB_PORT + 3)) \
    "$BASELINE_PORT" "$NCHAN_PORT" "$REDIS_PORT" "$NATS_PORT" $((NATS_PORT + 1)) $((NATS_PORT + 2)) \
    $((NATS_PORT + 100)) $((NATS_PORT + 101)) $((NATS_PORT + 102)); do
  port_free "$port" || busy=1
done
if [ "$busy" = 1 ]; then
  log "stop what listens there, or give another PORT_OFFSET (200, 1000, …)"
  exit 1
fi

mkdir -p "$RESULTS"
for s in $SCENARIOS; do
  # Every peer's, not only those about to run: a table must not set this batch's figures
  # beside an earlier batch's (or another machine's).
  for p in ssehub ssehub_memory baseline nchan; do
    clear_old "$s" "$p"
  done
  for run in $(seq 1 "$RUNS"); do
    for p in "${peers[@]}"; do
      case $s in
        S1) bench "$p" S1 "$run" --subscribers 1000 --updates 2000 --rate 200 --size 100 --publishers 16 ;;
        S2) bench "$p" S2 "$run" --subscribers 10000 --updates 300 --rate 20 --size 100 --publishers 16 \
              --source-ips 8 --connect-concurrency 500 ;;
        S3) for r in $S3_RATES; do
              bench "$p" "S3-$r" "$run" --subscribers 100 --updates $((r * S3_SECONDS)) --rate "$r" \
                --size 100 --publishers "$S3_PUBLISHERS" --timeout 5s
              f="$RESULTS/S3-$r-$p-$run.json"
              # Past the first rate with loss, p99 over 100 ms or publishes falling behind (the
              # publishers are closed-loop: each waits for its answer), higher rates only fail more.
              if ! [ -f "$f" ] || ! python3 -c 'import json,sys; r=json.load(open(sys.argv[1])); sys.exit(0 if r["lost"]==0 and r["latency_ms"]["p99"]<100 and r["rate_achieved"]>=0.9*r["rate_requested"] else 1)' "$f"; then
                break
              fi
            done ;;
        S4) bench "$p" S4 "$run" --subscribers 200 --slow 5 --updates 5000 --rate 500 --size 4096 --publishers 16
            bench "$p" S4-noslow "$run" --subscribers 200 --updates 5000 --rate 500 --size 4096 --publishers 16 ;;
        S5) bench "$p" S5 "$run" --subscribers 19000 --updates 1 --rate 1 --size 100 \
              --source-ips 8 --connect-concurrency 500 --settle 3s ;;
        S6) bench "$p" S6 "$run" --subscribers 10000 --topics 1000 --updates 2000 --rate 200 --publishers 16 \
              --size 100 --source-ips 8 --connect-concurrency 500
            # The brief's S6 has some subscribers by URI template; only ssehub has templates, so
            # the comparison above is exact topics only, and this run shows what templates cost.
            if [ "$p" = ssehub ]; then
              bench ssehub S6-templates "$run" --subscribers 10000 --topics 1000 --updates 2000 --rate 200 \
                --publishers 16 --size 100 --source-ips 8 --connect-concurrency 500 --template-share 10
              # The same tenth through Mercure 1.0 URL patterns instead of URI templates.
              bench ssehub S6-urlpatterns "$run" --subscribers 10000 --topics 1000 --updates 2000 --rate 200 \
                --publishers 16 --size 100 --source-ips 8 --connect-concurrency 500 --template-share 10 \
                --template-kind urlpattern
            fi ;;
        S7) if [ "$p" = ssehub ]; then s7 "$run"; fi ;;
        S7-nats) if [ "$p" = ssehub ]; then s7_nats "$run"; fi ;;
        # S2 again with a longer bound on the wait (the default budget would give 250 ms windows
        # here, the default bound holds them at 200 ms): less CPU per delivery, longer waits.
        S2-lean) if [ "$p" = ssehub ]; then
                   SSEHUB_FLAGS="--coalesce $LEAN_BOUND" bench ssehub S2-lean "$run" --subscribers 10000 \
                     --updates 300 --rate 20 --size 100 --publishers 16 --source-ips 8 \
                     --connect-concurrency 500
                 fi ;;
        SCALE) if [ "$p" = ssehub ]; then
                 for n in 1000 5000 10000 19000; do
                   bench ssehub "scale-$n" "$run" --subscribers "$n" --updates 200 --rate 20 --size 100 \
                     --publishers 16 --source-ips 8 --connect-concurrency 500
                 done
               fi ;;
        S1-tls|S1-h2)
            h2=(); [ "$s" = S1-h2 ] && h2=(--http2 --streams-per-connection 10)
            TLS=1 bench "$p" "$s" "$run" --tls "${h2[@]}" --subscribers "$TLS_SUBSCRIBERS" \
              --updates "$TLS_UPDATES" --rate 200 --size 100 --publishers 16 ;;
        S5-tls) TLS=1 bench "$p" S5-tls "$run" --tls --subscribers "$TLS_IDLE" --updates 1 --rate 1 \
                  --size 100 --source-ips 8 --connect-concurrency 500 --settle 3s ;;
        S5-h2) TLS=1 bench "$p" S5-h2 "$run" --tls --http2 --streams-per-connection 10 \
                 --subscribers "$TLS_IDLE" --updates 1 --rate 1 --size 100 --source-ips 8 \
                 --connect-concurrency 500 --settle 3s
               TLS=1 bench "$p" S5-h2-single "$run" --tls --http2 --streams-per-connection 1 \
                 --subscribers $((TLS_IDLE / 2)) --updates 1 --rate 1 --size 100 --source-ips 8 \
                 --connect-concurrency 500 --settle 3s ;;
        S1-light)
            # S1 at a quarter of its rate (50 updates/s): a load this machine has room for, where
            # batching should cost no latency. ssehub also runs at the old fixed default
            # (--write-budget 20000) and with no batching at all, for comparison.
            bench "$p" S1-light "$run" --subscribers 1000 --updates 500 --rate 50 --size 100 --publishers 16
            if [ "$p" = ssehub ]; then
              SSEHUB_FLAGS="--write-budget 20000" bench ssehub S1-light-wb20000 "$run" --subscribers 1000 \
                --updates 500 --rate 50 --size 100 --publishers 16
              SSEHUB_FLAGS="--coalesce 0" bench ssehub S1-light-coalesce0 "$run" --subscribers 1000 \
                --updates 500 --rate 50 --size 100 --publishers 16
            fi ;;
        FRONTIER) if [ "$p" = ssehub ]; then
                    for point in $FRONTIER_POINTS; do
                      case $point in
                        coalesce0) flags="--coalesce 0" ;;
                        wb*) flags="--write-budget ${point#wb}" ;;
                        *) log "FRONTIER: unknown point $point (coalesce0 or wbN)"; continue ;;
                      esac
                      SSEHUB_FLAGS="$flags" bench ssehub "FRONTIER-$point" "$run" --subscribers 1000 \
                        --updates 2000 --rate 200 --size 100 --publishers 16
                    done
                  fi ;;
        *) log "unknown scenario $s" ;;
      esac
    done
  done
done

log "writing docs/BENCHMARKS.md"
python3 bench/summarize.py "$RESULTS" > docs/BENCHMARKS.md.new
mv docs/BENCHMARKS.md.new docs/BENCHMARKS.md
log "done: docs/BENCHMARKS.md, raw JSON in $RESULTS/"
