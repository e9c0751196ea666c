#!/usr/bin/env bash
# A/B of two portcullis builds on one route, nothing else running: both processes on core 0
# (one under load at a time), nginx and wrk on core 1, ROUNDS rounds of DURATION in ABBA order,
# reporting req/s and proxy CPU per request for each round and their medians. Less noisy than
# a full compare.sh run for a "no slower than the commit before" check, since only the two
# builds alternate.
#
#   bench/ab.sh NEW_BIN BASE_BIN                  # the JWT + policy route
#   CONF=portcullis bench/ab.sh NEW_BIN BASE_BIN  # the plain route
#   CONF=portcullis-jwt-limits CONF_BASE=portcullis-jwt bench/ab.sh BIN BIN
#                                                 # two routes of one build: the cost of limits
#   CONF_BASE [CONF]: the rendered config the BASE_BIN process runs (another route of the same
#   build, to measure what one feature costs). portcullis-jwt-redis needs a redis-server on the
#   port its config names (compare.sh starts one only for its own run).
#   ROUNDS [10]  DURATION [5s]  OUT [bench/out]: a directory that bench/compare.sh (SCENARIO=jwt
#   or all) has filled: its nginx.conf, jwt/token.txt and the rendered portcullis configs.
#
# Everything stays on 127.0.0.1.
set -euo pipefail
NEW=${1:?usage: bench/ab.sh NEW_BIN BASE_BIN}
BASE=${2:?usage: bench/ab.sh NEW_BIN BASE_BIN}
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
OUT=${OUT:-$ROOT/bench/out}
CONF=${CONF:-portcullis-jwt}
CONF_BASE=${CONF_BASE:-$CONF}
ROUNDS=${ROUNDS:-10}
DURATION=${DURATION:-5s}
PORT_A=${PORT_A:-24690}
PORT_B=${PORT_B:-24691}
[[ -f $OUT/nginx.conf && -f $OUT/$CONF.yaml && -f $OUT/$CONF_BASE.yaml ]] || { echo "run bench/compare.sh first (OUT=$OUT)" >&2; exit 2; }
TOKEN=$(cat "$OUT/jwt/token.txt" 2>/dev/null || true)
PIDS=()
trap 'kill "${PIDS[@]}" 2>/dev/null || true' EXIT
taskset -c 1 /usr/sbin/nginx -c "$OUT/nginx.conf" -p "$OUT/" -e "$OUT/nginx-error.log" & PIDS+=($!)
# The rendered config listens on its own port: move each copy to its own. (The listener's
# `    bind:` line; not the admin listener's or the Redis URL's address.)
listen_port() { sed -n 's/^    bind: "127\.0\.0\.1:\([0-9]*\)".*/\1/p' "$1" | head -1; }
port=$(listen_port "$OUT/$CONF.yaml") port_base=$(listen_port "$OUT/$CONF_BASE.yaml")
sed "s/^    bind: \"127.0.0.1:$port\"/    bind: \"127.0.0.1:$PORT_A\"/" "$OUT/$CONF.yaml" >"$OUT/ab-new.yaml"
sed "s/^    bind: \"127.0.0.1:$port_base\"/    bind: \"127.0.0.1:$PORT_B\"/" "$OUT/$CONF_BASE.yaml" >"$OUT/ab-base.yaml"
taskset -c 0 env PORTCULLIS_LOG=warn "$NEW" run --config "$OUT/ab-new.yaml" >"$OUT/ab-new.log" 2>&1 & A=$!; PIDS+=($A)
taskset -c 0 env PORTCULLIS_LOG=warn "$BASE" run --config "$OUT/ab-base.yaml" >"$OUT/ab-base.log" 2>&1 & B=$!; PIDS+=($B)
sleep 2
hdr=()
[[ -n $TOKEN ]] && hdr=(-H "Authorization: Bearer $TOKEN")
ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
run() { # pid port: prints "req/s cpu_us_per_request"
    local t0 t1 out
    t0=$(ticks "$1")
    out=$(taskset -c 1 wrk -t1 -c64 -d"$DURATION" "${hdr[@]}" "http://127.0.0.1:$2/" 2>&1)
    t1=$(ticks "$1")
    python3 - "$out" "$t0" "$t1" "$(getconf CLK_TCK)" <<'PY'
import re, sys
out, t0, t1, hz = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
reqs = int(re.search(r"(\d+) requests in", out).group(1))
rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
print(f"{rps:.0f} {(t1 - t0) * 1e6 / hz / reqs:.2f}")
PY
}
run "$A" "$PORT_A" >/dev/null
run "$B" "$PORT_B" >/dev/null
rows=()
for r in $(seq 1 "$ROUNDS"); do
    if ((r % 2)); then a=$(run "$A" "$PORT_A"); b=$(run "$B" "$PORT_B"); else b=$(run "$B" "$PORT_B"); a=$(run "$A" "$PORT_A"); fi
    echo "round $r  new: $a  base: $b"
    rows+=("$a $b")
done
printf '%s\n' "${rows[@]}" | python3 -c '
import statistics, sys
rows = [list(map(float, l.split())) for l in sys.stdin if l.strip()]
med = lambda i: statistics.median(r[i] for r in rows)
print(f"median req/s: new {med(0):,.0f}, base {med(2):,.0f}: new/base {med(0) / med(2):.3f}")
print(f"median CPU per request: new {med(1):.2f} us, base {med(3):.2f} us: new/base {med(1) / med(3):.3f}")
print(f"median of per-round new/base req/s: {statistics.median(r[0] / r[2] for r in rows):.3f}")
'
