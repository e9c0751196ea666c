#!/usr/bin/env bash
# Instructions per request of portcullis variants, counted by valgrind's callgrind: a figure
# that does not move with the machine's noise (the same binary, config and requests give the
# same count), to set beside compare.sh's req/s when a change is a few percent.
#
#   OUT=/abs/bench/out-x bench/instructions.sh [VARIANT...]
#       default: portcullis-jwt portcullis-jwt-plan portcullis-jwt-limits
#
# OUT must hold a compare.sh run's configs and JWT files (any SCENARIO=jwt run, even of one
# short round). Each variant runs twice under callgrind, for N1 and N2 keep-alive requests
# from one client (bearer token from $OUT/jwt/token.txt) to the nginx origin of OUT; the
# difference of the two totals over N2 - N1 is the per-request count, without start-up and
# shutdown. Counts user-space instructions only: the kernel's share of a request (sockets)
# is not in it. Needs valgrind and nginx; callgrind files go to $OUT/callgrind/.
# `callgrind_annotate` on two of them shows where a difference lies.
# portcullis-jwt-redis and portcullis-jwt-redis-batch need a redis-server on the port their
# config names; their counts also hold the store's background syncs, which callgrind (50
# times slower) runs every few requests: several hundred instructions too many, and not
# the same from run to run.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:?OUT=<absolute path of a compare.sh run with SCENARIO=jwt>}
BIN=${PORTCULLIS_BIN:-$PWD/target/release/portcullis}
N1=${N1:-300}
N2=${N2:-1300}
(($# > 0)) || set -- portcullis-jwt portcullis-jwt-plan portcullis-jwt-limits
command -v valgrind >/dev/null || { echo "valgrind is not installed (apt-get install valgrind)" >&2; exit 1; }
NGINX=$(command -v nginx || echo /usr/sbin/nginx)
mkdir -p "$OUT/callgrind"
"$NGINX" -c "$OUT/nginx.conf" -p "$OUT/" -e "$OUT/nginx-error.log" >/dev/null 2>&1 &
ngx=$!
pid=
# The proxy under callgrind too, when a request fails (else it would keep its port).
trap 'kill $ngx $pid 2>/dev/null || true' EXIT
sleep 0.5
token=$(cat "$OUT/jwt/token.txt")
printf '%-34s %14s\n' variant instructions/request
for v in "$@"; do
    # The listener's `    bind:` line (not the admin listener's or the Redis URL's address).
    port=$(sed -n 's/^    bind: "127\.0\.0\.1:\([0-9]*\)".*/\1/p' "$OUT/$v.yaml" | head -1)
    totals=()
    for n in "$N1" "$N2"; do
        rm -rf "$OUT"/state-*
        out="$OUT/callgrind/$v-$n.out"
        valgrind --tool=callgrind --callgrind-out-file="$out" "$BIN" --log-format text run \
            --config "$OUT/$v.yaml" >"$OUT/callgrind/$v-$n.log" 2>&1 &
        pid=$!
        for _ in $(seq 1 300); do (echo >"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break; sleep 0.2; done
        python3 - "$port" "$n" "$token" <<'PY'
import http.client, sys
port, n, token = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
c = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
for _ in range(n):
    c.request("GET", "/", headers={"Authorization": "Bearer " + token})
    r = c.getresponse()
    r.read()
    assert r.status == 200, r.status
PY
        kill -TERM "$pid"
        wait "$pid" || true
        totals+=("$(sed -n 's/^totals: *//p' "$out")")
    done
    printf '%-34s %14s\n' "$v" "$(((totals[1] - totals[0]) / (N2 - N1)))"
done
