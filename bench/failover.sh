#!/usr/bin/env bash
# Failover timing: how long after an origin dies does its route answer from the fallback
# backend? A release build of portcullis, one route `app` on backend `primary` (one server,
# origin A) with a fallback backend `fallback` (origin B), active health checks on A, and
# two triggers (as in examples/automation.yaml):
#
#   failover  on dev.portcullis.backend.unhealthy (subject default/primary) → switch_route to fallback
#   failback  on dev.portcullis.server.up (subject default/primary/a1)      → restore_route
#
# Origin A is killed with SIGKILL KILLS times (20), restarted after each kill, and the route is
# waited for to come back before the next kill. A poller GETs the route every POLL_MS (5 ms)
# over a keep-alive connection. Reported, median and maximum over the kills:
#
#   (a) kill → switch visible: from the kill to the first answer from B;
#   (b) verdict → switch visible: from the health check's verdict (the `server.down` event's
#       time, from a JSON-lines events sink) to that first answer from B; also the verdict →
#       `automation.action` (switch_route applied) event time, and → the control path's
#       audit record of the switch;
#   and whether any request failed after the switch (while the route was on B), or during
#   the failback. The issue's failover test requires the switch within 1 s of the verdict.
#
#   bench/failover.sh                     # 20 kills; builds target/release/portcullis first
#   SKIP_BUILD=1 bench/failover.sh        # use the binary already built
#   KILLS=5 INTERVAL=100ms FALL=1 bench/failover.sh
#
# Origins are bench/failover_origin.py (python3 http.server, HTTP/1.1 keep-alive, answering
# "A" or "B"); the driver is bench/failover.py. Everything stays on 127.0.0.1.
#
# Environment (defaults in brackets):
#   KILLS [20]  POLL_MS [5]  HOLD [0.5] (seconds on B before A is restarted)  SEED [1]
#   INTERVAL [200ms]  TIMEOUT [200ms]  FALL [2]  RISE [2]: A's health check (an HTTP GET /)
#   PORTCULLIS_PORT [24710]  ADMIN_PORT [24711]  ORIGIN_A_PORT [24712]  ORIGIN_B_PORT [24713]
#   OUT [bench/out/failover]  SKIP_BUILD [0]  PORTCULLIS_BIN [target/release/portcullis]
# Output: $OUT/failover.json (every kill's timings), $OUT/failover.md (the table), the
# events ($OUT/events.jsonl), the audit trail ($OUT/audit) and the proxy's log.
# Exit status 1 when a switch was missing, took over 1 s from the verdict, or a request
# failed after the switch.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BENCH=$ROOT/bench
OUT=${OUT:-$BENCH/out/failover}
KILLS=${KILLS:-20}
POLL_MS=${POLL_MS:-5}
HOLD=${HOLD:-0.5}
SEED=${SEED:-1}
INTERVAL=${INTERVAL:-200ms}
TIMEOUT=${TIMEOUT:-200ms}
FALL=${FALL:-2}
RISE=${RISE:-2}
PORTCULLIS_PORT=${PORTCULLIS_PORT:-24710}
ADMIN_PORT=${ADMIN_PORT:-24711}
ORIGIN_A_PORT=${ORIGIN_A_PORT:-24712}
ORIGIN_B_PORT=${ORIGIN_B_PORT:-24713}
SKIP_BUILD=${SKIP_BUILD:-0}
PORTCULLIS_BIN=${PORTCULLIS_BIN:-${CARGO_TARGET_DIR:-$ROOT/target}/release/portcullis}
COMMAND="${*:-}"
COMMAND="$(env | grep -E '^(KILLS|POLL_MS|HOLD|SEED|INTERVAL|TIMEOUT|FALL|RISE|SKIP_BUILD)=' | sort | tr '\n' ' ')bench/failover.sh $COMMAND"

command -v python3 >/dev/null || { echo "failover.sh needs python3" >&2; exit 2; }
command -v curl >/dev/null || { echo "failover.sh needs curl" >&2; exit 2; }

# The interval in milliseconds, for the driver's random kill phase.
interval_ms=$(python3 -c '
import re, sys
m = re.fullmatch(r"(\d+)(ms|s)", sys.argv[1])
if not m: sys.exit("INTERVAL must be like 200ms or 1s")
print(int(m[1]) * (1 if m[2] == "ms" else 1000))' "$INTERVAL")

# The commit the binary was built from, in $PORTCULLIS_BIN.commit as bench/compare.sh keeps it.
if [[ $SKIP_BUILD != 1 ]]; then
    built=$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown)
    if [[ -n $(git -C "$ROOT" status --porcelain -- crates Cargo.toml Cargo.lock 2>/dev/null | head -1 || true) ]]; then
        built="$built+dirty"
    fi
    (cd "$ROOT" && cargo build --release -p portcullis)
    echo "$built" >"$PORTCULLIS_BIN.commit"
fi
[[ -x $PORTCULLIS_BIN ]] || { echo "no binary at $PORTCULLIS_BIN (build it, or unset SKIP_BUILD)" >&2; exit 2; }
if [[ -f $PORTCULLIS_BIN.commit && ! $PORTCULLIS_BIN -nt $PORTCULLIS_BIN.commit ]]; then
    commit=$(cat "$PORTCULLIS_BIN.commit")
else
    commit="unknown (prebuilt $PORTCULLIS_BIN; the work tree is at $(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo '?'))"
fi

rm -rf "$OUT"
mkdir -p "$OUT"
TOKEN=failover-bench-token-0123456789
cat >"$OUT/portcullis.yaml" <<EOF
listeners:
  - name: web
    bind: "127.0.0.1:$PORTCULLIS_PORT"
admin:
  bind: "127.0.0.1:$ADMIN_PORT"
  tokens: ["$TOKEN"]
state_dir: "$OUT/state"
audit: { sink: file, dir: "$OUT/audit" }
access_log: { path: "$OUT/access.log" }
events:
  sinks:
    - name: log
      file: { path: "$OUT/events.jsonl" }
      types: ["dev.portcullis.server.*", "dev.portcullis.backend.*", "dev.portcullis.automation.*"]
backends:
  - name: primary
    servers: [{ name: a1, address: "127.0.0.1:$ORIGIN_A_PORT" }]
    health_check: { http: { path: /, expect: 200 }, interval: $INTERVAL, timeout: $TIMEOUT, fall: $FALL, rise: $RISE }
  - name: fallback
    servers: [{ name: b1, address: "127.0.0.1:$ORIGIN_B_PORT" }]
routes:
  - { name: app, match: { path_prefix: / }, backend: primary, public: true }
triggers:
  - name: failover
    match: { type: dev.portcullis.backend.unhealthy, subject: default/primary }
    for_each: subject
    actions: [{ switch_route: { route: app, backend: fallback } }]
  - name: failback
    match: { type: dev.portcullis.server.up, subject: "default/primary/*" }
    for_each: subject
    actions: [{ restore_route: { route: app } }]
EOF
"$PORTCULLIS_BIN" check --config "$OUT/portcullis.yaml"

PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT

for port in "$PORTCULLIS_PORT" "$ADMIN_PORT" "$ORIGIN_A_PORT" "$ORIGIN_B_PORT"; do
    if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
        echo "port $port is taken: set PORTCULLIS_PORT, ADMIN_PORT, ORIGIN_A_PORT, ORIGIN_B_PORT" >&2
        exit 2
    fi
done

python3 "$BENCH/failover_origin.py" B "$ORIGIN_B_PORT" & PIDS+=($!)
PORTCULLIS_LOG=info "$PORTCULLIS_BIN" run --config "$OUT/portcullis.yaml" >"$OUT/portcullis.log" 2>&1 & PIDS+=($!)
for _ in $(seq 200); do
    curl -fs -o /dev/null "http://127.0.0.1:$ADMIN_PORT/readyz" && break
    sleep 0.05
done
curl -fs -o /dev/null "http://127.0.0.1:$ADMIN_PORT/readyz" || { echo "portcullis is not ready:" >&2; tail -20 "$OUT/portcullis.log" >&2; exit 1; }

echo "portcullis $commit: $KILLS kills of origin A, health check every $INTERVAL (fall $FALL, rise $RISE), polling every ${POLL_MS}ms"
status=0
PROXY_URL="http://127.0.0.1:$PORTCULLIS_PORT/" ORIGIN_A_PORT=$ORIGIN_A_PORT \
    EVENTS="$OUT/events.jsonl" AUDIT_DIR="$OUT/audit" OUT="$OUT" KILLS=$KILLS POLL_MS=$POLL_MS \
    INTERVAL_MS=$interval_ms HOLD=$HOLD SEED=$SEED COMMIT=$commit COMMAND="$COMMAND" \
    python3 "$BENCH/failover.py" || status=$?
# (Each kill logs its WARNs: the server down, the route switched. Errors are not expected.)
if grep -qE '"level":"ERROR"| ERROR ' "$OUT/portcullis.log"; then
    echo "errors in $OUT/portcullis.log:"
    grep -E '"level":"ERROR"| ERROR ' "$OUT/portcullis.log" | head -10
fi
exit $status
