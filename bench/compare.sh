#!/usr/bin/env bash
# Side-by-side benchmark: HAProxy (Debian) vs portcullis, both in front of the same nginx
# origin, all on loopback, in one run.
#
#   bench/compare.sh                 # full run: 5 interleaved rounds of 10 s, 10,000 idle conns
#   QUICK=1 bench/compare.sh         # smoke test: 2 rounds of 3 s, 1,000 idle conns
#   ROUNDS=7 DURATION=20s bench/compare.sh
#   SCENARIO=jwt bench/compare.sh    # only the JWT / policy / audit variants (+ portcullis plain)
#   BASE_BIN=/path/to/old/portcullis bench/compare.sh   # also the plain route of another
#                                    # build (variant portcullis-base), in the same rounds,
#                                    # for "no slower than the commit before" checks
#
# What it does:
#   1. installs haproxy, nginx-light and wrk with apt-get when missing (apt-get update only
#      when a package has no install candidate), and builds portcullis with
#      `cargo build --release`;
#   2. starts an nginx origin (1 worker, `return 200 "ok\n"`), HAProxy (nbthread 1, http
#      mode, http-reuse always, no logs) and portcullis (workers: 1, access log and audit
#      off, one `public: true` route: the plain proxy path, no identity or policy); with
#      PIN=1 (default) both proxies run on core PROXY_CPU (0) and nginx and wrk on LOAD_CPU (1);
#   3. warms each proxy up, then runs ROUNDS rounds of `wrk -t1 -c64 -d$DURATION --latency`
#      in ABBA order (round 1: HAProxy then portcullis, round 2: portcullis then HAProxy, ...)
#      so slow drift in machine load hits both alike; it also records each proxy's CPU time
#      (utime+stime from /proc/PID/stat) per round, as CPU microseconds per request;
#   4. restarts both proxies and measures their VmRSS with IDLE_CONNS idle keep-alive client
#      connections open (bench/idle_conns.py);
#   With SCENARIO=jwt or all (the default), the same rounds also run three more variants, all
#   sending `Authorization: Bearer <ES256 token>` (made by bench/jwt_setup.py with openssl):
#     haproxy-jwt           a second HAProxy frontend that checks the token with `jwt_verify`
#                           (alg pinned to ES256, the public key PEM) plus iss, aud and exp
#                           with jwt_payload_query;
#     portcullis-jwt        a `jwt` provider with a JWKS file, and a Cedar shorthand rule
#                           `allow: [{ groups: [bench] }]`; audit sink off (JWT + policy);
#     portcullis-jwt-audit  the same, plus the file audit trail (fsync: interval), one
#                           hash-chained record per request (JWT + policy + audit);
#     portcullis-jwt-limits portcullis-jwt plus a per-principal stick table, a rule and a
#                           usage plan that never trip (JWT + policy + limits);
#     portcullis-jwt-plan   portcullis-jwt plus only the per-principal usage plan (with its
#                           RateLimit headers and daily usage count): the benchmark the limits
#                           issue defines, a plan high enough never to trip;
#     portcullis-jwt-redis  portcullis-jwt-limits with its counters in Redis:
#                           `limits: { store: { redis: { url, timeout: 50ms } }, on_store_error: local }`,
#                           against a redis-server (`--save '' --appendonly no`) that the script
#                           starts on REDIS_PORT, pinned like the origin, and stops at exit; the
#                           variant also has an admin listener on ADMIN_PORT, and after the rounds
#                           the script asserts from its /metrics that
#                           portcullis_limit_store_errors_total stayed 0 (no check fell back to
#                           local counters) and records Redis's command counts;
#     portcullis-jwt-redis-batch  the same with local batching (`batch: 100ms`): views of hot
#                           entries and leases of plan tokens, against a second redis-server
#                           on REDIS_BATCH_PORT, checked the same way on ADMIN_BATCH_PORT;
#     haproxy-jwt-limits    the haproxy-jwt frontend plus a stick table tracked on `src`
#                           (`store http_req_rate(10s)`) and a deny rule that never trips, on
#                           its own port in the same HAProxy process: HAProxy's cost of a stick
#                           table, to set beside portcullis's cost of its limits.
#   Each portcullis variant is its own process (the audit sink is global), pinned like the others.
#   5. writes bench/out/results.json and bench/out/table.md and prints the markdown table.
#
# Environment (defaults in brackets):
#   SCENARIO [all]  plain = HAProxy vs portcullis, the plain proxy path (and the memory test);
#                   events = the plain and JWT + policy routes, each also with events on
#                   (portcullis-events, portcullis-jwt-events: a durable webhook sink to a
#                   closed port, so it keeps an outbox and retries, a JSON-lines file sink,
#                   and one trigger), in the same rounds: what events cost (target ≥ 0.98×);
#                   jwt = portcullis plain, haproxy-jwt, portcullis-jwt, portcullis-jwt-audit,
#                   portcullis-jwt-limits, portcullis-jwt-plan, haproxy-jwt-limits,
#                   portcullis-jwt-redis;
#                   all = both sets, interleaved in the same rounds
#   REDIS [1]       0 = leave out portcullis-jwt-redis, portcullis-jwt-redis-batch (and redis-server)
#   ROUNDS [5]  DURATION [10s]  WARMUP [3s]  THREADS [1]  CONNS [64]  IDLE_CONNS [10000]
#   QUICK [0]       1 = ROUNDS=2 DURATION=3s WARMUP=1s IDLE_CONNS=1000 unless set
#   PIN [1]         pin processes with taskset; PROXY_CPU [0], LOAD_CPU [1]
#   PARITY [1]      1 = HAProxy also adds X-Forwarded-For/-Proto/-Host and a per-request
#                   X-Request-Id (uuid) on request and response, as portcullis always does;
#                   0 = plain HAProxy forwarding
#   SKIP_INSTALL [0]  SKIP_BUILD [0]  SKIP_MEMORY [0]
#   KEEP_AUDIT [0]  1 = keep the audit trail the audit variant wrote in $OUT/audit (about
#                   600 bytes a request: a 5-round run writes over a gigabyte); by default
#                   it is counted, then deleted
#   ORIGIN_PORT [24680]  HAPROXY_PORT [24681]  PORTCULLIS_PORT [24682]
#   HAPROXY_JWT_PORT [24683]  PORTCULLIS_JWT_PORT [24684]  PORTCULLIS_AUDIT_PORT [24685]
#   PORTCULLIS_LIMITS_PORT [24688]  REDIS_PORT [24689]  PORTCULLIS_REDIS_PORT [24692]
#   HAPROXY_JWT_LIMITS_PORT [24693]  ADMIN_PORT [24694] (the admin listener of portcullis-jwt-redis)
#   PORTCULLIS_REDIS_BATCH_PORT [24699]  ADMIN_BATCH_PORT [24700]  REDIS_BATCH_PORT [24701]
#   HAPROXY_LOG_PORT [24695]  PORTCULLIS_LOG_PORT [24696]
#   PORTCULLIS_EVENTS_PORT [24697]  PORTCULLIS_JWT_EVENTS_PORT [24698]  PORTCULLIS_PLAN_PORT [24702]
#   OUT [bench/out]  PORTCULLIS_BIN [target/release/portcullis]
#   BASE_BIN [unset]  a second portcullis binary, run as variant portcullis-base on
#                   PORTCULLIS_BASE_PORT [24686] with the plain config (and, when the JWT
#                   variants run, as portcullis-jwt-base on PORTCULLIS_JWT_BASE_PORT [24687]);
#                   analyze.py reports this build / the base build (target ≥ 0.98×)
#   BUILD_FROM [worktree]  `head` = build the committed HEAD from `git archive` in
#                   $OUT/head-src (target dir $OUT/head-target), ignoring uncommitted edits
#   PROFILE [0]     1 = after the rounds, record `perf record --call-graph dwarf` of portcullis
#                   under one more wrk run into $OUT/perf.data (cpu-clock sampling, which
#                   works in VMs without hardware counters), with $OUT/perf-report.txt and
#                   a per-stage summary in $OUT/profile-summary.txt (bench/profile_summary.py)
#   PROFILE_VARIANT [portcullis]  the variant(s) PROFILE=1 profiles, one after the other, e.g.
#                   "portcullis-jwt-limits portcullis-jwt" (the summary of a route with limits
#                   also splits out the limit phase's frames); with more than one, the files
#                   are named perf-<variant>.data, perf-report-<variant>.txt and
#                   profile-summary-<variant>.txt
#   PERF_FREQ [499] the sampling frequency of that profile, in Hz
#
# Everything stays on 127.0.0.1. The script only needs the network for Debian packages.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BENCH=$ROOT/bench
OUT=${OUT:-$BENCH/out}

QUICK=${QUICK:-0}
SCENARIO=${SCENARIO:-all}
if [[ $QUICK == 1 ]]; then
    ROUNDS=${ROUNDS:-2}; DURATION=${DURATION:-3s}; WARMUP=${WARMUP:-1s}; IDLE_CONNS=${IDLE_CONNS:-1000}
fi
ROUNDS=${ROUNDS:-5}
DURATION=${DURATION:-10s}
WARMUP=${WARMUP:-3s}
THREADS=${THREADS:-1}
CONNS=${CONNS:-64}
IDLE_CONNS=${IDLE_CONNS:-10000}
PIN=${PIN:-1}
PROXY_CPU=${PROXY_CPU:-0}
LOAD_CPU=${LOAD_CPU:-1}
PARITY=${PARITY:-1}
SKIP_INSTALL=${SKIP_INSTALL:-0}
SKIP_BUILD=${SKIP_BUILD:-0}
SKIP_MEMORY=${SKIP_MEMORY:-0}
PROFILE=${PROFILE:-0}
ORIGIN_PORT=${ORIGIN_PORT:-24680}
HAPROXY_PORT=${HAPROXY_PORT:-24681}
PORTCULLIS_PORT=${PORTCULLIS_PORT:-24682}
HAPROXY_JWT_PORT=${HAPROXY_JWT_PORT:-24683}
PORTCULLIS_JWT_PORT=${PORTCULLIS_JWT_PORT:-24684}
PORTCULLIS_AUDIT_PORT=${PORTCULLIS_AUDIT_PORT:-24685}
PORTCULLIS_LIMITS_PORT=${PORTCULLIS_LIMITS_PORT:-24688}
PORTCULLIS_PLAN_PORT=${PORTCULLIS_PLAN_PORT:-24702}
REDIS_PORT=${REDIS_PORT:-24689}
PORTCULLIS_REDIS_PORT=${PORTCULLIS_REDIS_PORT:-24692}
HAPROXY_JWT_LIMITS_PORT=${HAPROXY_JWT_LIMITS_PORT:-24693}
ADMIN_PORT=${ADMIN_PORT:-24694}
HAPROXY_LOG_PORT=${HAPROXY_LOG_PORT:-24695}
PORTCULLIS_LOG_PORT=${PORTCULLIS_LOG_PORT:-24696}
PORTCULLIS_EVENTS_PORT=${PORTCULLIS_EVENTS_PORT:-24697}
PORTCULLIS_JWT_EVENTS_PORT=${PORTCULLIS_JWT_EVENTS_PORT:-24698}
PORTCULLIS_REDIS_BATCH_PORT=${PORTCULLIS_REDIS_BATCH_PORT:-24699}
ADMIN_BATCH_PORT=${ADMIN_BATCH_PORT:-24700}
REDIS_BATCH_PORT=${REDIS_BATCH_PORT:-24701}
REDIS=${REDIS:-1}
PROFILE_VARIANT=${PROFILE_VARIANT:-portcullis}
PERF_FREQ=${PERF_FREQ:-499}
JWT_ISSUER=https://issuer.bench.portcullis.test
JWT_AUDIENCE=portcullis-bench
case $SCENARIO in
    plain) VARIANTS=(haproxy portcullis) ;;
    jwt) VARIANTS=(portcullis haproxy-jwt portcullis-jwt portcullis-jwt-audit portcullis-jwt-limits portcullis-jwt-plan haproxy-jwt-limits) ;;
    log) VARIANTS=(haproxy portcullis haproxy-log portcullis-log portcullis-jwt-audit) ;;
    events) VARIANTS=(haproxy portcullis portcullis-events portcullis-jwt portcullis-jwt-events) ;;
    all) VARIANTS=(haproxy portcullis haproxy-log portcullis-log haproxy-jwt portcullis-jwt portcullis-jwt-audit portcullis-jwt-limits portcullis-jwt-plan haproxy-jwt-limits) ;;
    tls | h2 | handshakes | workers) exec bash "$BENCH/tls.sh" ;;
    *) echo "SCENARIO must be plain, jwt, log, events, all, tls, h2, handshakes or workers" >&2; exit 2 ;;
esac
if [[ $SCENARIO != plain && $SCENARIO != log && $SCENARIO != events && $REDIS == 1 ]]; then VARIANTS+=(portcullis-jwt-redis portcullis-jwt-redis-batch); fi
has_variant() { local v; for v in "${VARIANTS[@]}"; do [[ $v == "$1" ]] && return 0; done; return 1; }
BASE_BIN=${BASE_BIN:-}
PORTCULLIS_BASE_PORT=${PORTCULLIS_BASE_PORT:-24686}
PORTCULLIS_JWT_BASE_PORT=${PORTCULLIS_JWT_BASE_PORT:-24687}
if [[ -n $BASE_BIN ]]; then
    [[ -x $BASE_BIN ]] || { echo "BASE_BIN $BASE_BIN is not an executable" >&2; exit 2; }
    VARIANTS+=(portcullis-base)
    has_variant portcullis-jwt && VARIANTS+=(portcullis-jwt-base)
fi
BUILD_FROM=${BUILD_FROM:-worktree}
if [[ $BUILD_FROM == head ]]; then
    PORTCULLIS_BIN=${PORTCULLIS_BIN:-$OUT/head-target/release/portcullis}
else
    PORTCULLIS_BIN=${PORTCULLIS_BIN:-${CARGO_TARGET_DIR:-$ROOT/target}/release/portcullis}
fi
NGINX_BIN=/usr/sbin/nginx

log() { printf '\033[1m[bench]\033[0m %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

# ---------------------------------------------------------------------------------------
# 1. Tools and build
# ---------------------------------------------------------------------------------------
install_tools() {
    local need=()
    command -v haproxy >/dev/null 2>&1 || need+=(haproxy)
    [[ -x $NGINX_BIN ]] || need+=(nginx-light)
    command -v wrk >/dev/null 2>&1 || need+=(wrk)
    if [[ $PROFILE == 1 ]]; then command -v perf >/dev/null 2>&1 || need+=(linux-perf); fi
    if has_variant portcullis-jwt-redis; then command -v redis-server >/dev/null 2>&1 || need+=(redis-server); fi
    [[ ${#need[@]} -eq 0 ]] && return 0
    [[ $(id -u) -eq 0 ]] || die "need root to install ${need[*]}"
    local p update=0
    for p in "${need[@]}"; do
        if ! apt-cache policy "$p" 2>/dev/null | grep 'Candidate: [0-9]' >/dev/null; then update=1; fi
    done
    if [[ $update == 1 ]]; then
        log "apt-get update"
        apt-get update -qq
    fi
    # Keep the packages' init scripts from starting system-wide services (nginx on :80).
    local made_policy=0
    if [[ ! -e /usr/sbin/policy-rc.d ]]; then
        printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
        chmod +x /usr/sbin/policy-rc.d
        made_policy=1
    fi
    log "apt-get install ${need[*]}"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null \
        || { [[ $made_policy == 1 ]] && rm -f /usr/sbin/policy-rc.d; die "apt-get install failed"; }
    [[ $made_policy == 1 ]] && rm -f /usr/sbin/policy-rc.d
    return 0
}

[[ $SKIP_INSTALL == 1 ]] || install_tools
for t in haproxy wrk python3 curl; do command -v "$t" >/dev/null || die "$t not found"; done
if has_variant portcullis-jwt-redis; then
    command -v redis-server >/dev/null || die "redis-server not found (apt-get install redis-server), or run with REDIS=0"
fi
[[ -x $NGINX_BIN ]] || die "$NGINX_BIN not found"
if [[ $PIN == 1 ]]; then
    command -v taskset >/dev/null || die "taskset not found (util-linux); or run with PIN=0"
    [[ $(nproc) -ge 2 ]] || { log "one CPU only: not pinning"; PIN=0; }
fi

if [[ $SKIP_BUILD != 1 ]]; then
    if [[ $BUILD_FROM == head ]]; then
        # Build the committed HEAD, untouched by uncommitted edits in the work tree.
        log "cargo build --release -p portcullis (git HEAD $(git -C "$ROOT" rev-parse --short HEAD), in $OUT/head-src)"
        rm -rf "$OUT/head-src"
        mkdir -p "$OUT/head-src"
        BUILT_COMMIT=$(git -C "$ROOT" rev-parse --short HEAD)
        git -C "$ROOT" archive "$BUILT_COMMIT" | tar -x -C "$OUT/head-src"
        (cd "$OUT/head-src" && CARGO_TARGET_DIR="$OUT/head-target" cargo build --release -p portcullis --quiet)
    else
        log "cargo build --release -p portcullis"
        BUILT_COMMIT=$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown)
        if [[ -n $(git -C "$ROOT" status --porcelain -- crates Cargo.toml Cargo.lock 2>/dev/null | head -1 || true) ]]; then
            BUILT_COMMIT="$BUILT_COMMIT+dirty"
        fi
        (cd "$ROOT" && cargo build --release -p portcullis --quiet)
    fi
    # Remember which commit the binary was built from, for runs with SKIP_BUILD=1.
    echo "$BUILT_COMMIT" >"$PORTCULLIS_BIN.commit"
fi
[[ -x $PORTCULLIS_BIN ]] || die "$PORTCULLIS_BIN not found"

# ---------------------------------------------------------------------------------------
# 2. Processes
# ---------------------------------------------------------------------------------------
rm -rf "$OUT/raw"
mkdir -p "$OUT/raw" "$OUT/nginx-tmp"
# Proxies and the idle-connection client inherit the highest open-file limit we may set.
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
NOFILE=$(ulimit -n)

# Command prefixes (arrays, not functions, so `cmd &` leaves $! = the real process's pid:
# taskset and env exec the program in place).
ON_PROXY=() ON_LOAD=()
if [[ $PIN == 1 ]]; then ON_PROXY=(taskset -c "$PROXY_CPU") ON_LOAD=(taskset -c "$LOAD_CPU"); fi

render() { # template output [KEY=VALUE ...]: fills in the at-sign placeholders
    local parity_fe="" jwt_fe="" jwt_checks=""
    if [[ $PARITY == 1 ]]; then
        parity_fe=$'    option forwardfor\n    http-request set-header X-Forwarded-Proto http\n    http-request set-header X-Forwarded-Host %[req.hdr(host)]\n    unique-id-format %[uuid()]\n    unique-id-header X-Request-Id\n    http-after-response set-header X-Request-Id %[unique-id]'
    fi
    if has_variant haproxy-jwt; then
        # HAProxy 2.6 `jwt_verify` checks only the signature, so iss, aud and exp are checked
        # with jwt_payload_query, as the HAProxy docs and blog suggest. The alg is pinned to
        # ES256 (jwt_verify would otherwise trust the token's own `alg`).
        jwt_checks="    http-request set-var(txn.bearer) http_auth_bearer
    http-request set-var(txn.jwt_alg) var(txn.bearer),jwt_header_query('\$.alg')
    http-request deny status 401 unless { var(txn.jwt_alg) -m str ES256 }
    http-request deny status 401 unless { var(txn.bearer),jwt_verify(txn.jwt_alg,\"$OUT/jwt/es256.pub.pem\") -m int 1 }
    http-request deny status 401 unless { var(txn.bearer),jwt_payload_query('\$.iss') -m str $JWT_ISSUER }
    http-request deny status 401 unless { var(txn.bearer),jwt_payload_query('\$.aud') -m str $JWT_AUDIENCE }
    http-request set-var(txn.exp) var(txn.bearer),jwt_payload_query('\$.exp','int')
    http-request set-var(txn.now) date()
    http-request deny status 401 if { var(txn.exp),sub(txn.now) -m int lt 0 }
    http-request deny status 403 unless { var(txn.bearer),jwt_payload_query('\$.groups[0]') -m str bench }"
        jwt_fe="frontend fe_jwt
    bind 127.0.0.1:$HAPROXY_JWT_PORT
    maxconn $((IDLE_CONNS + 1000))
    default_backend be
$jwt_checks
$parity_fe"
    fi
    if has_variant haproxy-jwt-limits; then
        # The same frontend plus a stick table on the client address and a rule that never
        # trips, as portcullis-jwt-limits counts every request and checks a rule (after the
        # token and the group check, as portcullis counts after authorize).
        jwt_fe="$jwt_fe

frontend fe_jwt_limits
    bind 127.0.0.1:$HAPROXY_JWT_LIMITS_PORT
    maxconn $((IDLE_CONNS + 1000))
    default_backend be
    stick-table type ip size 1m expire 10m store http_req_rate(10s)
$jwt_checks
    http-request track-sc0 src
    http-request deny deny_status 429 if { sc_http_req_rate(0) gt 1000000000 }
$parity_fe"
    fi
    local log_fe="" global_log=""
    if has_variant haproxy-log; then
        # HAProxy's access log as its users run it: `option httplog`, one line per request
        # written to stdout (which compare.sh sends to $OUT/haproxy.log), on a frontend of its
        # own; the other frontends stay silent (no `log global` in their section).
        global_log="    log stdout format raw local0"
        log_fe="frontend fe_log
    bind 127.0.0.1:$HAPROXY_LOG_PORT
    maxconn $((IDLE_CONNS + 1000))
    log global
    option httplog
    default_backend be
$parity_fe"
    fi
    local maxconn=$((IDLE_CONNS + 1000))
    env OUT="$OUT" ORIGIN_PORT="$ORIGIN_PORT" HAPROXY_PORT="$HAPROXY_PORT" PORTCULLIS_PORT="$PORTCULLIS_PORT" \
        MAXCONN="$maxconn" PARITY_FRONTEND="$parity_fe" JWT_FRONTEND="$jwt_fe" LOG_FRONTEND="$log_fe" GLOBAL_LOG="$global_log" \
        ACCESS_LOG='access_log: { path: "off" }' \
        JWT_ISSUER="$JWT_ISSUER" JWT_AUDIENCE="$JWT_AUDIENCE" ROOT_LIMITS='' ROUTE_LIMITS='' ADMIN='' EVENTS='' "${@:3}" \
        python3 - "$1" "$2" <<'PY'
import os, re, sys
src, dst = sys.argv[1], sys.argv[2]
t = open(src).read()
t = re.sub(r"@([A-Z_]+)@", lambda m: os.environ.get(m.group(1), m.group(0)), t)
open(dst, "w").write(t)
PY
}

if [[ " ${VARIANTS[*]}" == *-jwt* ]]; then
    log "ES256 key, JWKS and token in $OUT/jwt (bench/jwt_setup.py)"
    python3 "$BENCH/jwt_setup.py" "$OUT/jwt" "$JWT_ISSUER" "$JWT_AUDIENCE" || die "jwt_setup.py failed"
    TOKEN=$(cat "$OUT/jwt/token.txt")
fi
rm -rf "$OUT/audit"

render "$BENCH/nginx.conf.tmpl" "$OUT/nginx.conf"
render "$BENCH/haproxy.cfg.tmpl" "$OUT/haproxy.cfg"
render "$BENCH/portcullis.yaml.tmpl" "$OUT/portcullis.yaml"
render "$BENCH/portcullis.yaml.tmpl" "$OUT/portcullis-base.yaml" PORTCULLIS_PORT="$PORTCULLIS_BASE_PORT"
# The plain route with the default access log (JSON lines to stdout, which start_portcullis
# sends to $OUT/portcullis-log.log), as users run it.
render "$BENCH/portcullis.yaml.tmpl" "$OUT/portcullis-log.yaml" PORTCULLIS_PORT="$PORTCULLIS_LOG_PORT" \
    ACCESS_LOG="access_log: { path: stdout, format: ${ACCESS_LOG_FORMAT:-json} }"
# Events on: each route with a durable webhook sink to a closed port (so it keeps an outbox
# and retries), a JSON-lines file sink and one trigger, each process with a state_dir of its
# own for the outbox and the trigger's firings.
events_block() { # state_dir
    printf '%s\n' "state_dir: \"$1\"" \
        'events:' '  sinks:' \
        '    - { name: hook, webhook: { url: "http://127.0.0.1:9/hook", secret: "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw", durable: true } }' \
        "    - { name: lines, file: { path: \"$1/events.jsonl\" } }" \
        'triggers:' '  - name: failover' '    match: { type: dev.portcullis.server.down }' '    cooldown: 1m' \
        '    actions:' '      - set_server_state: { backend: origin, server: nginx, state: ready }'
}
rm -rf "$OUT/state-events" "$OUT/state-jwt-events"
render "$BENCH/portcullis.yaml.tmpl" "$OUT/portcullis-events.yaml" PORTCULLIS_PORT="$PORTCULLIS_EVENTS_PORT" \
    EVENTS="$(events_block "$OUT/state-events")"
render "$BENCH/portcullis-jwt.yaml.tmpl" "$OUT/portcullis-jwt-events.yaml" PORT="$PORTCULLIS_JWT_EVENTS_PORT" AUDIT='audit: { sink: "off" }' \
    EVENTS="$(events_block "$OUT/state-jwt-events")"
# (render leaves ROOT_LIMITS, ROUTE_LIMITS, ADMIN and EVENTS empty unless given)
render "$BENCH/portcullis-jwt.yaml.tmpl" "$OUT/portcullis-jwt-base.yaml" PORT="$PORTCULLIS_JWT_BASE_PORT" AUDIT='audit: { sink: "off" }'
render "$BENCH/portcullis-jwt.yaml.tmpl" "$OUT/portcullis-jwt.yaml" PORT="$PORTCULLIS_JWT_PORT" AUDIT='audit: { sink: "off" }'
render "$BENCH/portcullis-jwt.yaml.tmpl" "$OUT/portcullis-jwt-audit.yaml" PORT="$PORTCULLIS_AUDIT_PORT" \
    AUDIT="audit: { sink: file, dir: \"$OUT/audit\", fsync: interval }"
# JWT + policy + limits: a per-principal table with a rule and a plan that never trip.
LIMITS_TABLES=$'stick_tables:\n  - { name: per_principal, key: principal, size: 100000, expire: 10m, store: ["http_req_rate(10s)", "http_err_rate(1m)"] }\nusage_plans:\n  - { name: bench, rate: 100000000/s, burst: 100000000 }'
LIMITS_ROUTE='limits: { track: [per_principal], rules: [{ table: per_principal, counter: "http_req_rate(10s)", above: 1000000000 }], plan: bench }'
# Each process with a usage plan keeps its daily usage in a state_dir of its own.
rm -rf "$OUT/state-limits" "$OUT/state-plan" "$OUT/state-redis" "$OUT/state-redis-batch"
render "$BENCH/portcullis-jwt.yaml.tmpl" "$OUT/portcullis-jwt-limits.yaml" PORT="$PORTCULLIS_LIMITS_PORT" AUDIT='audit: { sink: "off" }' \
    ROOT_LIMITS="state_dir: \"$OUT/state-limits\""$'\n'"$LIMITS_TABLES" ROUTE_LIMITS="$LIMITS_ROUTE"
# The plan alone: what the limits issue's benchmark names.
render "$BENCH/portcullis-jwt.yaml.tmpl" "$OUT/portcullis-jwt-plan.yaml" PORT="$PORTCULLIS_PLAN_PORT" AUDIT='audit: { sink: "off" }' \
    ROOT_LIMITS="state_dir: \"$OUT/state-plan\""$'\nusage_plans:\n  - { name: bench, rate: 100000000/s, burst: 100000000 }' ROUTE_LIMITS='limits: { plan: bench }'
# The same with the counters in Redis (falling back to local counters if Redis does not answer
# within 50 ms, which the metrics check below must show never happened), and an admin
# listener for that check. The admin token is made for this run.
ADMIN_TOKEN=bench-$(od -An -N16 -tx1 /dev/urandom | tr -d ' \n')
render "$BENCH/portcullis-jwt.yaml.tmpl" "$OUT/portcullis-jwt-redis.yaml" PORT="$PORTCULLIS_REDIS_PORT" AUDIT='audit: { sink: "off" }' \
    ROOT_LIMITS="state_dir: \"$OUT/state-redis\""$'\nlimits: { store: { redis: { url: "redis://127.0.0.1:'"$REDIS_PORT"$'", timeout: 50ms } }, on_store_error: local }\n'"$LIMITS_TABLES" \
    ROUTE_LIMITS="$LIMITS_ROUTE" ADMIN="admin: { bind: \"127.0.0.1:$ADMIN_PORT\", tokens: [\"$ADMIN_TOKEN\"] }"
# The same with local batching, against its own redis-server.
render "$BENCH/portcullis-jwt.yaml.tmpl" "$OUT/portcullis-jwt-redis-batch.yaml" PORT="$PORTCULLIS_REDIS_BATCH_PORT" AUDIT='audit: { sink: "off" }' \
    ROOT_LIMITS="state_dir: \"$OUT/state-redis-batch\""$'\nlimits: { store: { redis: { url: "redis://127.0.0.1:'"$REDIS_BATCH_PORT"$'", timeout: 50ms, batch: 100ms } }, on_store_error: local }\n'"$LIMITS_TABLES" \
    ROUTE_LIMITS="$LIMITS_ROUTE" ADMIN="admin: { bind: \"127.0.0.1:$ADMIN_BATCH_PORT\", tokens: [\"$ADMIN_TOKEN\"] }"

PIDS=()
ORIGIN_PID="" HAPROXY_PID=""
declare -A PID_OF=() PORT_OF=(
    [haproxy]=$HAPROXY_PORT [portcullis]=$PORTCULLIS_PORT [haproxy-jwt]=$HAPROXY_JWT_PORT
    [portcullis-jwt]=$PORTCULLIS_JWT_PORT [portcullis-jwt-audit]=$PORTCULLIS_AUDIT_PORT
    [portcullis-base]=$PORTCULLIS_BASE_PORT [portcullis-jwt-base]=$PORTCULLIS_JWT_BASE_PORT
    [portcullis-jwt-limits]=$PORTCULLIS_LIMITS_PORT [haproxy-jwt-limits]=$HAPROXY_JWT_LIMITS_PORT
    [portcullis-jwt-plan]=$PORTCULLIS_PLAN_PORT
    [portcullis-jwt-redis]=$PORTCULLIS_REDIS_PORT [haproxy-log]=$HAPROXY_LOG_PORT
    [portcullis-log]=$PORTCULLIS_LOG_PORT [portcullis-events]=$PORTCULLIS_EVENTS_PORT
    [portcullis-jwt-events]=$PORTCULLIS_JWT_EVENTS_PORT
    [portcullis-jwt-redis-batch]=$PORTCULLIS_REDIS_BATCH_PORT)
cleanup() {
    local p
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    for p in "${PIDS[@]}"; do wait "$p" 2>/dev/null || true; done
}
trap cleanup EXIT
trap 'exit 130' INT TERM

port_busy() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
wait_port() { # port pid name
    local i
    for i in $(seq 1 100); do
        port_busy "$1" && return 0
        kill -0 "$2" 2>/dev/null || die "$3 exited; see $OUT/$3.log"
        sleep 0.1
    done
    die "$3 did not listen on $1; see $OUT/$3.log"
}

EXTRA_PORTS=()
has_variant portcullis-jwt-redis && EXTRA_PORTS+=("$REDIS_PORT" "$ADMIN_PORT")
has_variant portcullis-jwt-redis-batch && EXTRA_PORTS+=("$REDIS_BATCH_PORT" "$ADMIN_BATCH_PORT")
for p in "$ORIGIN_PORT" "${PORT_OF[@]}" "${EXTRA_PORTS[@]}"; do
    port_busy "$p" && die "port $p is already in use (set ORIGIN_PORT/HAPROXY_PORT/PORTCULLIS_PORT)"
done

start_origin() {
    "$NGINX_BIN" -t -q -c "$OUT/nginx.conf" -p "$OUT/" -e "$OUT/nginx-error.log" >"$OUT/nginx.log" 2>&1 \
        || die "nginx config invalid: $(cat "$OUT/nginx.log")"
    "${ON_LOAD[@]}" "$NGINX_BIN" -c "$OUT/nginx.conf" -p "$OUT/" -e "$OUT/nginx-error.log" >"$OUT/nginx.log" 2>&1 &
    ORIGIN_PID=$!; PIDS+=("$ORIGIN_PID")
    wait_port "$ORIGIN_PORT" "$ORIGIN_PID" nginx
}
start_haproxy() {
    haproxy -c -q -f "$OUT/haproxy.cfg" >"$OUT/haproxy.log" 2>&1 || die "haproxy config invalid: $(cat "$OUT/haproxy.log")"
    "${ON_PROXY[@]}" haproxy -db -f "$OUT/haproxy.cfg" >"$OUT/haproxy.log" 2>&1 &
    HAPROXY_PID=$!; PIDS+=("$HAPROXY_PID")
    wait_port "$HAPROXY_PORT" "$HAPROXY_PID" haproxy
    PID_OF[haproxy]=$HAPROXY_PID PID_OF[haproxy-jwt]=$HAPROXY_PID PID_OF[haproxy-jwt-limits]=$HAPROXY_PID
    PID_OF[haproxy-log]=$HAPROXY_PID
}
start_redis() { # [port] [name]: a redis-server of our own: no persistence, pinned like the origin
    local port=${1:-$REDIS_PORT} name=${2:-redis} pid
    "${ON_LOAD[@]}" redis-server --bind 127.0.0.1 --port "$port" --save '' --appendonly no \
        --dir "$OUT" --logfile "$OUT/$name.log" --daemonize no >/dev/null 2>&1 &
    pid=$!; PIDS+=("$pid")
    wait_port "$port" "$pid" "$name"
}
redis_cmd() { redis-cli -h 127.0.0.1 -p "${REDIS_AT:-$REDIS_PORT}" "$@"; }
start_portcullis() { # [variant]: portcullis, portcullis-jwt, portcullis-jwt-audit or portcullis-base
    local v=${1:-portcullis} pid bin=$PORTCULLIS_BIN
    [[ $v == portcullis-base || $v == portcullis-jwt-base ]] && bin=$BASE_BIN
    "$bin" check --config "$OUT/$v.yaml" >"$OUT/$v.log" 2>&1 \
        || die "$v config invalid: $(cat "$OUT/$v.log")"
    "${ON_PROXY[@]}" env PORTCULLIS_LOG=warn "$bin" --log-format text run --config "$OUT/$v.yaml" >"$OUT/$v.log" 2>&1 &
    pid=$!; PIDS+=("$pid"); PID_OF[$v]=$pid
    wait_port "${PORT_OF[$v]}" "$pid" "$v"
}
stop() { # pid
    kill "$1" 2>/dev/null || true
    wait "$1" 2>/dev/null || true
    local keep=() p
    for p in "${PIDS[@]}"; do [[ $p == "$1" ]] || keep+=("$p"); done
    PIDS=("${keep[@]}")
}
wait_free() { # port
    local i
    for i in $(seq 1 50); do port_busy "$1" || return 0; sleep 0.1; done
    die "port $1 still in use"
}

is_jwt() { [[ $1 == *-jwt* ]]; }
check_proxy() { # variant
    local body port=${PORT_OF[$1]} code
    local auth=()
    if is_jwt "$1"; then
        auth=(-H "Authorization: Bearer $TOKEN")
        # Without a token, or with a token whose signature is broken, the origin must not answer.
        code=$(curl -sS --max-time 5 -o /dev/null -w '%{http_code}' "http://127.0.0.1:$port/check") || die "$1: request failed"
        [[ $code == 401 ]] || die "$1: request without a token got $code, expected 401"
        # (flip one character in the middle of the signature, not the last one: its low bits are padding)
        local i=$((${#TOKEN} - 20)) c=A
        [[ ${TOKEN:i:1} == A ]] && c=B
        code=$(curl -sS --max-time 5 -o /dev/null -w '%{http_code}' -H "Authorization: Bearer ${TOKEN:0:i}$c${TOKEN:i+1}" "http://127.0.0.1:$port/check") || die "$1: request failed"
        [[ $code == 401 ]] || die "$1: request with a forged token got $code, expected 401"
    fi
    body=$(curl -sS --max-time 5 "${auth[@]}" -D "$OUT/raw/$1-headers.txt" "http://127.0.0.1:$port/check") || die "$1: request failed"
    [[ $body == ok ]] || die "$1: unexpected body '$body' (see $OUT/raw/$1-headers.txt)"
}

cpu_ticks() { awk '{print $14, $15}' "/proc/$1/stat"; } # utime stime, in clock ticks

log "SCENARIO=$SCENARIO: ${VARIANTS[*]}"
log "starting nginx origin :$ORIGIN_PORT and $(for v in "${VARIANTS[@]}"; do printf '%s :%s, ' "$v" "${PORT_OF[$v]}"; done)PIN=$PIN"
start_origin
has_variant portcullis-jwt-redis && start_redis
has_variant portcullis-jwt-redis-batch && start_redis "$REDIS_BATCH_PORT" redis-batch
start_haproxy
start_portcullis portcullis
has_variant portcullis-log && start_portcullis portcullis-log
has_variant portcullis-events && start_portcullis portcullis-events
has_variant portcullis-jwt-events && start_portcullis portcullis-jwt-events
has_variant portcullis-jwt && start_portcullis portcullis-jwt
has_variant portcullis-jwt-audit && start_portcullis portcullis-jwt-audit
has_variant portcullis-jwt-limits && start_portcullis portcullis-jwt-limits
has_variant portcullis-jwt-plan && start_portcullis portcullis-jwt-plan
has_variant portcullis-jwt-redis && start_portcullis portcullis-jwt-redis
has_variant portcullis-jwt-redis-batch && start_portcullis portcullis-jwt-redis-batch
has_variant portcullis-base && start_portcullis portcullis-base
has_variant portcullis-jwt-base && start_portcullis portcullis-jwt-base
for v in "${VARIANTS[@]}"; do check_proxy "$v"; done

LOAD_START=$(cut -d' ' -f1-3 /proc/loadavg)

# ---------------------------------------------------------------------------------------
# 3. Throughput and latency rounds
# ---------------------------------------------------------------------------------------
run_wrk() { # variant port duration outfile
    local pid=${PID_OF[$1]}
    local t0 t1 hdr=()
    is_jwt "$1" && hdr=(-H "Authorization: Bearer $TOKEN")
    read -r -a t0 <<<"$(cpu_ticks "$pid")"
    "${ON_LOAD[@]}" wrk -t"$THREADS" -c"$CONNS" -d"$3" --latency "${hdr[@]}" "http://127.0.0.1:$2/" >"$4" 2>&1 || die "wrk failed: $(cat "$4")"
    read -r -a t1 <<<"$(cpu_ticks "$pid")"
    echo "cpu_ticks $((t1[0] - t0[0] + t1[1] - t0[1])) user $((t1[0] - t0[0])) sys $((t1[1] - t0[1]))" >>"$4"
    echo "loadavg $(cut -d' ' -f1 /proc/loadavg)" >>"$4"
}
port_of() { echo "${PORT_OF[$1]}"; }

log "warm-up ($WARMUP each)"
for p in "${VARIANTS[@]}"; do run_wrk "$p" "$(port_of "$p")" "$WARMUP" "$OUT/raw/warmup-$p.txt"; done
if has_variant portcullis-jwt-audit; then
    AUDIT_LINES_BEFORE=$(cat "$OUT"/audit/* 2>/dev/null | wc -l)
    AUDIT_REQS=0
fi

for r in $(seq 1 "$ROUNDS"); do
    # ABBA: odd rounds run the variants in order, even rounds in reverse.
    order=("${VARIANTS[@]}")
    if ((r % 2 == 0)); then
        order=(); for ((i = ${#VARIANTS[@]} - 1; i >= 0; i--)); do order+=("${VARIANTS[i]}"); done
    fi
    for p in "${order[@]}"; do
        f="$OUT/raw/$p-r$r.txt"
        run_wrk "$p" "$(port_of "$p")" "$DURATION" "$f"
        log "round $r/$ROUNDS $(printf '%-20s' "$p") $(grep -m1 'Requests/sec' "$f" | tr -s ' ')  p99 $(awk '$1=="99%"{print $2}' "$f")"
        if [[ $p == portcullis-jwt-audit ]]; then
            AUDIT_REQS=$((AUDIT_REQS + $(awk '/requests in/{print $1; exit}' "$f")))
        fi
    done
done
if has_variant portcullis-jwt-audit; then
    # Every answered request must have its audit record (record_allows defaults to true).
    sleep 0.5
    AUDIT_RECORDS=$(( $(cat "$OUT"/audit/* 2>/dev/null | wc -l) - AUDIT_LINES_BEFORE ))
    AUDIT_BYTES=$(du -sb "$OUT/audit" | cut -f1)
    log "audit: $AUDIT_RECORDS records written during the rounds; wrk counted $AUDIT_REQS completed requests ($AUDIT_BYTES bytes in $OUT/audit)"
    export AUDIT_RECORDS AUDIT_REQS AUDIT_BYTES
    if [[ ${KEEP_AUDIT:-0} != 1 ]]; then
        rm -rf "$OUT/audit"
        log "audit: trail deleted (KEEP_AUDIT=1 keeps it)"
    fi
fi

if has_variant portcullis-log; then
    # Both access logs must have been written (a line per request), then they are emptied:
    # a 5-round run writes gigabytes.
    LOG_LINES_HAPROXY=$(grep -c ' "GET / HTTP/1.1"' "$OUT/haproxy.log" || true)
    LOG_LINES_PORTCULLIS=$(grep -c '"path":"/"' "$OUT/portcullis-log.log" || true)
    log "access logs: HAProxy wrote $LOG_LINES_HAPROXY lines, portcullis $LOG_LINES_PORTCULLIS lines (the files are emptied now)"
    ((LOG_LINES_HAPROXY > 0)) || die "HAProxy wrote no access log lines (see $OUT/haproxy.cfg)"
    [[ ${ACCESS_LOG_FORMAT:-json} != json ]] || ((LOG_LINES_PORTCULLIS > 0)) || die "portcullis wrote no access log lines"
    : >"$OUT/haproxy.log"; : >"$OUT/portcullis-log.log"
    export LOG_LINES_HAPROXY LOG_LINES_PORTCULLIS
fi

if has_variant portcullis-jwt-redis; then
    # The Redis variant must have measured Redis, not the local fallback: no check may have
    # failed over to `on_store_error`, and Redis must have run the checks.
    metrics=$(curl -sS --max-time 5 -H "Authorization: Bearer $ADMIN_TOKEN" "http://127.0.0.1:$ADMIN_PORT/metrics") \
        || die "portcullis-jwt-redis: GET /metrics failed"
    printf '%s\n' "$metrics" >"$OUT/raw/metrics-portcullis-jwt-redis.txt"
    STORE_ERRORS=$(printf '%s\n' "$metrics" | awk '/^portcullis_limit_store_errors_total/ {s += $NF} END {print s + 0}')
    LIMIT_CHECKS=$(printf '%s\n' "$metrics" | awk '/^portcullis_limit_checks_total/ {s += $NF} END {print s + 0}')
    redis_cmd INFO commandstats >"$OUT/raw/redis-commandstats.txt" 2>&1 || true
    redis_cmd INFO stats >"$OUT/raw/redis-stats.txt" 2>&1 || true
    REDIS_COMMANDS=$(awk -F: '/^total_commands_processed/ {print $2 + 0}' "$OUT/raw/redis-stats.txt")
    # (the checks are one EVALSHA each; the commands the script runs inside are counted too)
    REDIS_EVALSHA=$(sed -n 's/^cmdstat_evalsha:calls=\([0-9]*\),.*usec_per_call=\([0-9.]*\).*/\1 \2/p' "$OUT/raw/redis-commandstats.txt")
    REDIS_EVALSHA_US=${REDIS_EVALSHA#* } REDIS_EVALSHA=${REDIS_EVALSHA%% *}
    REDIS_KEYS=$(redis_cmd DBSIZE 2>/dev/null || echo '?')
    log "portcullis-jwt-redis: portcullis_limit_store_errors_total $STORE_ERRORS, limit checks $LIMIT_CHECKS; redis: ${REDIS_EVALSHA:-0} EVALSHA (${REDIS_EVALSHA_US:-?} us each in Redis), $REDIS_COMMANDS commands processed, $REDIS_KEYS keys"
    export STORE_ERRORS LIMIT_CHECKS REDIS_COMMANDS REDIS_KEYS REDIS_EVALSHA REDIS_EVALSHA_US
    ((STORE_ERRORS == 0)) || die "portcullis-jwt-redis: $STORE_ERRORS limit checks failed over to the local store (see $OUT/raw/metrics-portcullis-jwt-redis.txt): the variant did not measure Redis"
    ((${REDIS_EVALSHA:-0} > 0)) || die "portcullis-jwt-redis: Redis ran no limit checks (no EVALSHA in $OUT/raw/redis-commandstats.txt)"
fi
if has_variant portcullis-jwt-redis-batch; then
    # Batching must have used Redis too (leases and syncs), never the local fallback.
    metrics=$(curl -sS --max-time 5 -H "Authorization: Bearer $ADMIN_TOKEN" "http://127.0.0.1:$ADMIN_BATCH_PORT/metrics") \
        || die "portcullis-jwt-redis-batch: GET /metrics failed"
    printf '%s\n' "$metrics" >"$OUT/raw/metrics-portcullis-jwt-redis-batch.txt"
    BATCH_STORE_ERRORS=$(printf '%s\n' "$metrics" | awk '/^portcullis_limit_store_errors_total/ {s += $NF} END {print s + 0}')
    BATCH_LIMIT_CHECKS=$(printf '%s\n' "$metrics" | awk '/^portcullis_limit_checks_total/ {s += $NF} END {print s + 0}')
    REDIS_AT=$REDIS_BATCH_PORT redis_cmd INFO commandstats >"$OUT/raw/redis-batch-commandstats.txt" 2>&1 || true
    BATCH_EVALSHA=$(sed -n 's/^cmdstat_evalsha:calls=\([0-9]*\),.*usec_per_call=\([0-9.]*\).*/\1 \2/p' "$OUT/raw/redis-batch-commandstats.txt")
    BATCH_EVALSHA_US=${BATCH_EVALSHA#* } BATCH_EVALSHA=${BATCH_EVALSHA%% *}
    log "portcullis-jwt-redis-batch: portcullis_limit_store_errors_total $BATCH_STORE_ERRORS, limit checks $BATCH_LIMIT_CHECKS; redis: ${BATCH_EVALSHA:-0} EVALSHA (${BATCH_EVALSHA_US:-?} us each in Redis)"
    export BATCH_STORE_ERRORS BATCH_LIMIT_CHECKS BATCH_EVALSHA BATCH_EVALSHA_US
    ((BATCH_STORE_ERRORS == 0)) || die "portcullis-jwt-redis-batch: $BATCH_STORE_ERRORS limit checks failed over to the local store: the variant did not measure Redis"
    ((${BATCH_EVALSHA:-0} > 0)) || die "portcullis-jwt-redis-batch: Redis ran no calls (no EVALSHA in $OUT/raw/redis-batch-commandstats.txt)"
fi

if [[ $PROFILE == 1 ]]; then
    command -v perf >/dev/null || die "perf not found (apt-get install linux-perf)"
    read -r -a profiled <<<"$PROFILE_VARIANT"
    for v in "${profiled[@]}"; do
        has_variant "$v" && [[ $v == portcullis* ]] || die "PROFILE_VARIANT $v is not a portcullis variant of this run"
    done
    for v in "${profiled[@]}"; do
        # One variant keeps the historical names (perf.data, ...); several get -<variant>.
        sfx=""; ((${#profiled[@]} > 1)) && sfx="-$v"
        log "profiling $v under wrk for $DURATION"
        perf record -F "$PERF_FREQ" -e cpu-clock --call-graph dwarf,16384 -p "${PID_OF[$v]}" -o "$OUT/perf$sfx.data" >/dev/null 2>&1 &
        PERF_PID=$!
        run_wrk "$v" "$(port_of "$v")" "$DURATION" "$OUT/raw/profile-$v.txt"
        kill -INT "$PERF_PID"; wait "$PERF_PID" || true
        perf report -i "$OUT/perf$sfx.data" --no-inline --no-children --percent-limit 0.5 --stdio >"$OUT/perf-report$sfx.txt" 2>/dev/null || true
        perf report -i "$OUT/perf$sfx.data" --no-inline --children --percent-limit 2 --stdio -g none >"$OUT/perf-report-children$sfx.txt" 2>/dev/null || true
        python3 "$BENCH/profile_summary.py" "$OUT/perf$sfx.data" >"$OUT/profile-summary$sfx.txt" 2>&1 || true
        log "profile: $OUT/profile-summary$sfx.txt, $OUT/perf-report$sfx.txt"
    done
fi

LOAD_END=$(cut -d' ' -f1-3 /proc/loadavg)

# ---------------------------------------------------------------------------------------
# 4. Memory with idle keep-alive connections (fresh processes)
# ---------------------------------------------------------------------------------------
if [[ $SKIP_MEMORY != 1 ]] && has_variant haproxy; then
    if ((NOFILE < IDLE_CONNS + 200)); then
        die "open-file limit $NOFILE is too low for IDLE_CONNS=$IDLE_CONNS"
    fi
    stop "$HAPROXY_PID"; stop "${PID_OF[portcullis]}"
    wait_free "$HAPROXY_PORT"; wait_free "$PORTCULLIS_PORT"
    start_haproxy
    start_portcullis portcullis
    for p in haproxy portcullis; do
        pid=${PID_OF[$p]}
        log "memory: $IDLE_CONNS idle keep-alive connections to $p"
        "${ON_LOAD[@]}" python3 "$BENCH/idle_conns.py" --port "$(port_of "$p")" --pid "$pid" --conns "$IDLE_CONNS" \
            >"$OUT/raw/mem-$p.json" 2>"$OUT/raw/mem-$p.err" || log "warning: $p memory test had failures: $(cat "$OUT/raw/mem-$p.json" "$OUT/raw/mem-$p.err")"
        if ! kill -0 "$pid" 2>/dev/null; then
            st=0; wait "$pid" || st=$?
            die "$p died during the memory test (exit status $st); see $OUT/$p.log"
        fi
    done
fi

# ---------------------------------------------------------------------------------------
# 5. Results
# ---------------------------------------------------------------------------------------
# (|| true: `head` closing the pipe early must not end the script under pipefail)
HAPROXY_VERSION=$(haproxy -v 2>/dev/null | head -1 || true)
NGINX_VERSION=$("$NGINX_BIN" -v 2>&1 | head -1 || true)
WRK_VERSION=$(wrk -v 2>&1 | head -1 || true)
if [[ -f $PORTCULLIS_BIN.commit && $PORTCULLIS_BIN -nt $PORTCULLIS_BIN.commit ]]; then
    # Rebuilt by hand after this script last built it (SKIP_BUILD=1): the stamp is stale.
    COMMIT="unknown (built after $(cat "$PORTCULLIS_BIN.commit"); the work tree was at $(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo '?'))"
elif [[ -f $PORTCULLIS_BIN.commit ]]; then
    COMMIT=$(cat "$PORTCULLIS_BIN.commit")
else
    COMMIT="unknown (prebuilt $PORTCULLIS_BIN)"
fi

BASE_COMMIT=""
[[ -n $BASE_BIN && -f $BASE_BIN.commit ]] && BASE_COMMIT=$(cat "$BASE_BIN.commit")
[[ -n $BASE_BIN && -z $BASE_COMMIT ]] && BASE_COMMIT="$BASE_BIN"
export BASE_COMMIT
export SCENARIO ROUNDS DURATION WARMUP THREADS CONNS IDLE_CONNS PIN PROXY_CPU LOAD_CPU PARITY QUICK \
    HAPROXY_VERSION NGINX_VERSION WRK_VERSION COMMIT LOAD_START LOAD_END NOFILE
python3 "$BENCH/analyze.py" "$OUT" | tee "$OUT/table.md"
log "results: $OUT/results.json, $OUT/table.md"
