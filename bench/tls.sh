#!/usr/bin/env bash
# HTTPS side by side: HAProxy (Debian) and portcullis with the same ECDSA P-256 certificate,
# in front of the same nginx origin (HTTP/1.1), all on loopback, in one run. compare.sh runs
# this for SCENARIO=tls (all of it), h2, handshakes or workers (one part):
#
#   SCENARIO=tls bench/compare.sh            # h2, h1 over TLS, handshakes, two workers
#   SCENARIO=h2 ROUNDS=5 bench/compare.sh    # only h2 over TLS
#
# Parts (each in ROUNDS interleaved rounds, ABBA order, medians reported):
#   h2          h2load -c16 -m100 (16 connections × 100 concurrent streams), TLS 1.3, ALPN h2;
#               also HTTP/1.1 over TLS with keep-alive (wrk -c64) for reference.
#   handshakes  new TLS 1.3 handshakes per second, no resumption (h2load runs of 500
#               connections with one request each), and resumed ones (`openssl s_time
#               -reuse`), from HANDSHAKE_CLIENTS parallel clients; with the
#               proxy's CPU time per handshake, which compares the two proxies even when the
#               clients are the limit (on two cores they are).
#   workers     plain HTTP/1.1 (wrk -t2 -c64), proxies with one and with two threads
#               (`nbthread` / `workers:`), nothing pinned: how the proxies scale to a second
#               core that the origin and the load generator share with them.
# With PIN=1 (default) the proxies run on PROXY_CPU and the origin and clients on LOAD_CPU,
# except in the workers part. Results: $OUT/tls/results.json and a markdown table on stdout.
#
# Environment: ROUNDS [5] DURATION [10s] WARMUP [2s] QUICK [0] PIN [1] PROXY_CPU [0]
# LOAD_CPU [1] HANDSHAKE_CLIENTS [2] SKIP_BUILD [0] SKIP_INSTALL [0] OUT [bench/out]
# PORTCULLIS_BIN [target/release/portcullis]; ports 24700-24709.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BENCH=$ROOT/bench
OUT=${OUT:-$BENCH/out}/tls
SCENARIO=${SCENARIO:-tls}
QUICK=${QUICK:-0}
if [[ $QUICK == 1 ]]; then ROUNDS=${ROUNDS:-2}; DURATION=${DURATION:-3s}; WARMUP=${WARMUP:-1s}; fi
ROUNDS=${ROUNDS:-5}
DURATION=${DURATION:-10s}
WARMUP=${WARMUP:-2s}
PIN=${PIN:-1}
PROXY_CPU=${PROXY_CPU:-0}
LOAD_CPU=${LOAD_CPU:-1}
HANDSHAKE_CLIENTS=${HANDSHAKE_CLIENTS:-2}
PORTCULLIS_BIN=${PORTCULLIS_BIN:-${CARGO_TARGET_DIR:-$ROOT/target}/release/portcullis}
ORIGIN_PORT=24700 HAPROXY_PORT=24701 PORTCULLIS_PORT=24702 HAPROXY2_PORT=24703 PORTCULLIS2_PORT=24704
HAPROXY_PLAIN_PORT=24705 PORTCULLIS_PLAIN_PORT=24706 HAPROXY2_PLAIN_PORT=24707 PORTCULLIS2_PLAIN_PORT=24708
SECS=${DURATION%s}
export DURATION

log() { printf '\033[1m[tls]\033[0m %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

case $SCENARIO in
    tls) PARTS=(h2 handshakes workers) ;;
    h2 | handshakes | workers) PARTS=("$SCENARIO") ;;
    *) die "SCENARIO must be tls, h2, handshakes or workers" ;;
esac
has_part() { [[ " ${PARTS[*]} " == *" $1 "* ]]; }

if [[ ${SKIP_INSTALL:-0} != 1 ]] && ! command -v h2load >/dev/null; then
    [[ $(id -u) -eq 0 ]] || die "need root to install nghttp2-client (h2load)"
    log "apt-get install nghttp2-client"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends nghttp2-client >/dev/null \
        || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends nghttp2-client >/dev/null; }
fi
for t in haproxy h2load wrk openssl nginx python3 taskset; do
    command -v "$t" >/dev/null || [[ -x /usr/sbin/$t ]] || die "$t not found"
done
if [[ ${SKIP_BUILD:-0} != 1 ]]; then
    log "cargo build --release -p portcullis"
    (cd "$ROOT" && cargo build --release -p portcullis --quiet)
fi
COMMIT=$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown)
[[ -n $(git -C "$ROOT" status --porcelain -- crates Cargo.toml Cargo.lock 2>/dev/null | head -1 || true) ]] && COMMIT="$COMMIT+dirty"

rm -rf "$OUT"; mkdir -p "$OUT/raw" "$OUT/nginx-tmp"
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
ON_PROXY=() ON_LOAD=()
if [[ $PIN == 1 ]]; then ON_PROXY=(taskset -c "$PROXY_CPU") ON_LOAD=(taskset -c "$LOAD_CPU"); fi

# One ECDSA P-256 certificate for both proxies.
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 2 \
    -subj /CN=localhost -addext "subjectAltName=DNS:localhost,IP:127.0.0.1" \
    -keyout "$OUT/key.pem" -out "$OUT/cert.pem" 2>/dev/null
cat "$OUT/cert.pem" "$OUT/key.pem" >"$OUT/haproxy.pem"

sed -e "s#@OUT@#$OUT#g" -e "s#@ORIGIN_PORT@#$ORIGIN_PORT#g" "$BENCH/nginx.conf.tmpl" >"$OUT/nginx.conf"
haproxy_cfg() { # threads tls_port plain_port
    cat <<EOF
global
    nbthread $1
    maxconn 20000
    no strict-limits
    ssl-default-bind-options ssl-min-ver TLSv1.2
defaults
    mode http
    timeout connect 5s
    timeout client 60s
    timeout server 60s
    timeout http-request 10s
    timeout http-keep-alive 60s
    option http-keep-alive
    http-reuse always
frontend fe_tls
    bind 127.0.0.1:$2 ssl crt $OUT/haproxy.pem alpn h2,http/1.1
    default_backend be
    option forwardfor
    http-request set-header X-Forwarded-Proto https
    unique-id-format %[uuid()]
    unique-id-header X-Request-Id
frontend fe_plain
    bind 127.0.0.1:$3
    default_backend be
    option forwardfor
    unique-id-format %[uuid()]
    unique-id-header X-Request-Id
backend be
    server origin 127.0.0.1:$ORIGIN_PORT
EOF
}
portcullis_cfg() { # workers tls_port plain_port
    cat <<EOF
workers: $1
access_log: { path: "off" }
audit: { sink: "off" }
listeners:
  - name: tls
    bind: "127.0.0.1:$2"
    tls: { certificates: [{ cert: "$OUT/cert.pem", key: "$OUT/key.pem" }] }
  - name: plain
    bind: "127.0.0.1:$3"
backends:
  - name: origin
    servers: [{ name: nginx, address: "127.0.0.1:$ORIGIN_PORT" }]
routes:
  - { name: all, match: { path_prefix: / }, backend: origin, public: true }
EOF
}
haproxy_cfg 1 $HAPROXY_PORT $HAPROXY_PLAIN_PORT >"$OUT/haproxy1.cfg"
haproxy_cfg 2 $HAPROXY2_PORT $HAPROXY2_PLAIN_PORT >"$OUT/haproxy2.cfg"
portcullis_cfg 1 $PORTCULLIS_PORT $PORTCULLIS_PLAIN_PORT >"$OUT/portcullis1.yaml"
portcullis_cfg 2 $PORTCULLIS2_PORT $PORTCULLIS2_PLAIN_PORT >"$OUT/portcullis2.yaml"

PIDS=()
cleanup() { local p; for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT
trap 'exit 130' INT TERM
port_busy() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
wait_port() { local i; for i in $(seq 1 100); do port_busy "$1" && return 0; kill -0 "$2" 2>/dev/null || die "$3 exited: $(tail -5 "$OUT/$3.log")"; sleep 0.1; done; die "$3 did not listen on $1"; }
for p in $ORIGIN_PORT $HAPROXY_PORT $PORTCULLIS_PORT $HAPROXY2_PORT $PORTCULLIS2_PORT; do
    port_busy "$p" && die "port $p is in use"
done

"${ON_LOAD[@]}" /usr/sbin/nginx -c "$OUT/nginx.conf" -p "$OUT/" -e "$OUT/nginx-error.log" >"$OUT/nginx.log" 2>&1 &
PIDS+=($!); wait_port $ORIGIN_PORT $! nginx
declare -A PID_OF=() PORT_OF=([haproxy]=$HAPROXY_PORT [portcullis]=$PORTCULLIS_PORT
    [haproxy-2]=$HAPROXY2_PLAIN_PORT [portcullis-2]=$PORTCULLIS2_PLAIN_PORT
    [haproxy-1]=$HAPROXY_PLAIN_PORT [portcullis-1]=$PORTCULLIS_PLAIN_PORT)
start() { # name pin(0|1) cmd...
    local name=$1 pin=$2; shift 2
    if [[ $pin == 1 ]]; then "${ON_PROXY[@]}" "$@" >"$OUT/$name.log" 2>&1 & else "$@" >"$OUT/$name.log" 2>&1 & fi
    PID_OF[$name]=$!; PIDS+=($!)
}
start haproxy 1 haproxy -db -f "$OUT/haproxy1.cfg"
wait_port $HAPROXY_PORT "${PID_OF[haproxy]}" haproxy
start portcullis 1 env PORTCULLIS_LOG=warn "$PORTCULLIS_BIN" --log-format text run --config "$OUT/portcullis1.yaml"
wait_port $PORTCULLIS_PORT "${PID_OF[portcullis]}" portcullis
PID_OF[haproxy-1]=${PID_OF[haproxy]} PID_OF[portcullis-1]=${PID_OF[portcullis]}
if has_part workers; then
    start haproxy-2 0 haproxy -db -f "$OUT/haproxy2.cfg"
    wait_port $HAPROXY2_PORT "${PID_OF[haproxy-2]}" haproxy-2
    start portcullis-2 0 env PORTCULLIS_LOG=warn "$PORTCULLIS_BIN" --log-format text run --config "$OUT/portcullis2.yaml"
    wait_port $PORTCULLIS2_PORT "${PID_OF[portcullis-2]}" portcullis-2
fi
for v in haproxy portcullis; do
    body=$(curl -sS --max-time 5 --http2 --cacert "$OUT/cert.pem" -o - -w ' %{http_version}' "https://localhost:${PORT_OF[$v]}/") || die "$v: HTTPS request failed"
    [[ $body == "ok"*" 2" ]] || die "$v: expected ok over HTTP/2, got '$body'"
done

cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
measure() { # name pid outfile cmd...: runs cmd, appends the proxy's CPU ticks
    local pid=$2 f=$3 t0 t1; shift 3
    t0=$(cpu_ticks "$pid")
    "$@" >"$f" 2>&1 || die "$(basename "$f"): $* failed: $(tail -3 "$f")"
    t1=$(cpu_ticks "$pid")
    echo "cpu_ticks $((t1 - t0))" >>"$f"
}
h2_run() { # variant secs outfile
    measure "$1" "${PID_OF[$1]}" "$3" "${ON_LOAD[@]}" h2load -c16 -m100 -t1 -D "$2" --warm-up-time=1 "https://127.0.0.1:${PORT_OF[$1]}/"
}
h1tls_run() {
    measure "$1" "${PID_OF[$1]}" "$3" "${ON_LOAD[@]}" wrk -t1 -c64 -d"$2"s "https://127.0.0.1:${PORT_OF[$1]}/"
}
hs_run() { # variant secs outfile mode(-new|-reuse)
    # New handshakes: HANDSHAKE_CLIENTS loops of h2load, each run opening 500 connections
    # that make one request each (a full TLS 1.3 handshake per connection; h2load never
    # resumes). Resumed handshakes: as many `openssl s_time -reuse` clients.
    local pid=${PID_OF[$1]} f=$3 t0 t1 i end clients=()
    t0=$(cpu_ticks "$pid")
    end=$((SECONDS + $2))
    for i in $(seq 1 "$HANDSHAKE_CLIENTS"); do
        if [[ $4 == -new ]]; then
            (while ((SECONDS < end)); do
                "${ON_LOAD[@]}" h2load -c500 -n500 -t1 "https://127.0.0.1:${PORT_OF[$1]}/" 2>&1 | grep -E '^(finished in|requests:)'
            done) >"$f.$i" &
        else
            "${ON_LOAD[@]}" openssl s_time -connect "127.0.0.1:${PORT_OF[$1]}" -reuse -time "$2" >"$f.$i" 2>&1 &
        fi
        clients+=($!)
    done
    wait "${clients[@]}"
    t1=$(cpu_ticks "$pid")
    cat "$f".* >"$f"; rm -f "$f".*
    echo "cpu_ticks $((t1 - t0))" >>"$f"
}
workers_run() {
    measure "$1" "${PID_OF[$1]}" "$3" wrk -t2 -c64 -d"$2"s "http://127.0.0.1:${PORT_OF[$1]}/"
}

run_part() { # part runner variants...
    local part=$1 runner=$2 r v order; shift 2
    log "$part: warm-up"
    for v in "$@"; do $runner "$v" "${WARMUP%s}" "$OUT/raw/warmup-$part-$v.txt" ${MODE:+"$MODE"}; done
    for r in $(seq 1 "$ROUNDS"); do
        order=("$@")
        if ((r % 2 == 0)); then order=(); for ((i = $# ; i >= 1; i--)); do order+=("${!i}"); done; fi
        for v in "${order[@]}"; do
            $runner "$v" "$SECS" "$OUT/raw/$part-$v-r$r.txt" ${MODE:+"$MODE"}
            log "$part round $r/$ROUNDS $v: $(python3 "$BENCH/tls_analyze.py" --one "$OUT/raw/$part-$v-r$r.txt" "$part")"
        done
    done
}

if has_part h2; then
    MODE="" run_part h2 h2_run haproxy portcullis
    MODE="" run_part h1tls h1tls_run haproxy portcullis
fi
if has_part handshakes; then
    MODE=-new run_part handshakes-new hs_run haproxy portcullis
    MODE=-reuse run_part handshakes-reuse hs_run haproxy portcullis
fi
if has_part workers; then
    MODE="" run_part workers workers_run haproxy-1 portcullis-1 haproxy-2 portcullis-2
fi

export COMMIT ROUNDS DURATION PIN HANDSHAKE_CLIENTS
HAPROXY_VERSION=$(haproxy -v 2>/dev/null | head -1 || true) H2LOAD_VERSION=$(h2load --version 2>/dev/null | head -1 || true)
OPENSSL_VERSION=$(openssl version) && export HAPROXY_VERSION H2LOAD_VERSION OPENSSL_VERSION
python3 "$BENCH/tls_analyze.py" "$OUT" | tee "$OUT/table.md"
