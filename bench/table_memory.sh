#!/usr/bin/env bash
# Memory of a stick table of 1,000,000 keys, measured on the proxy process: portcullis, then
# HAProxy, each in front of the same nginx origin as bench/compare.sh, on loopback.
#
#   bench/table_memory.sh                       # 1,000,000 keys into each proxy
#   BUILD_FROM=head bench/table_memory.sh       # the binary compare.sh built from git HEAD
#   KEYS=100000 HAPROXY=0 bench/table_memory.sh # a quick look at portcullis alone
#
# What it does, for each proxy:
#   1. starts it (one worker / one thread, no logs) with one public route that tracks a table
#      keyed by the X-Client request header, sized for 1,100,000 entries and storing
#      http_req_rate(10s), http_err_rate(1m) and conn_cur:
#        portcullis  stick_tables: [{ name: per_client, key: "header:x-client", size: 1100000,
#                      store: [http_req_rate(10s), http_err_rate(1m), conn_cur] }], the route
#                      with `limits: { track: [per_client] }`, and an admin listener;
#        HAProxy     stick-table type string len 32 size 1100000 expire 10m
#                      store http_req_rate(10s),http_err_rate(1m),conn_cur,
#                      `http-request track-sc0 req.hdr(x-client)`, and a stats socket;
#   2. warms it up with WARMUP of wrk without the header (the table stays empty, but the
#      connections, buffers and upstream pool exist), then reads VmRSS from /proc/PID/status;
#   3. sends KEYS requests, each with a distinct X-Client value (`10.a.b.c`, at most 11 bytes:
#      a counter in wrk's Lua request function), over CONNS connections; wrk stops itself after
#      KEYS responses;
#   4. checks the table holds about KEYS entries (portcullis: admin API `GET /api/v1/tables`;
#      HAProxy: `show table` on the stats socket), then reads VmRSS (and VmHWM) again.
#   It writes $OUT/table-memory.json and prints a markdown table.
#
# A header value of up to 22 bytes is stored inline in portcullis's key, exactly as an IPv4
# `src` key is (docs/limits.md, "Memory and bounds"), so the figure stands for 1,000,000
# client addresses, which one loopback client cannot produce from distinct source addresses.
#
# Environment (defaults in brackets):
#   KEYS [1000000]  SIZE [1100000]  CONNS [32]  WARMUP [2s]  HAPROXY [1] (0 = portcullis only)
#   PIN [1]  PROXY_CPU [0]  LOAD_CPU [1]: the proxy on one core, nginx and wrk on the other
#   ORIGIN_PORT [24700]  PORTCULLIS_PORT [24701]  ADMIN_PORT [24702]  HAPROXY_PORT [24703]
#   OUT [bench/out/table-memory]  BUILD_FROM [worktree]: `head` = the binary compare.sh
#   BUILD_FROM=head built in bench/out/head-target  PORTCULLIS_BIN [target/release/portcullis]
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BENCH=$ROOT/bench
OUT=${OUT:-$BENCH/out/table-memory}
KEYS=${KEYS:-1000000}
SIZE=${SIZE:-1100000}
CONNS=${CONNS:-32}
WARMUP=${WARMUP:-2s}
HAPROXY=${HAPROXY:-1}
PIN=${PIN:-1}
PROXY_CPU=${PROXY_CPU:-0}
LOAD_CPU=${LOAD_CPU:-1}
ORIGIN_PORT=${ORIGIN_PORT:-24700}
PORTCULLIS_PORT=${PORTCULLIS_PORT:-24701}
ADMIN_PORT=${ADMIN_PORT:-24702}
HAPROXY_PORT=${HAPROXY_PORT:-24703}
BUILD_FROM=${BUILD_FROM:-worktree}
if [[ $BUILD_FROM == head ]]; then
    PORTCULLIS_BIN=${PORTCULLIS_BIN:-$BENCH/out/head-target/release/portcullis}
else
    PORTCULLIS_BIN=${PORTCULLIS_BIN:-${CARGO_TARGET_DIR:-$ROOT/target}/release/portcullis}
fi
NGINX_BIN=/usr/sbin/nginx

log() { printf '\033[1m[table-memory]\033[0m %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

[[ -x $PORTCULLIS_BIN ]] || die "$PORTCULLIS_BIN not found (build it, or run bench/compare.sh with BUILD_FROM=head first)"
for t in wrk curl python3; do command -v "$t" >/dev/null || die "$t not found (bench/compare.sh installs it)"; done
[[ -x $NGINX_BIN ]] || die "$NGINX_BIN not found (bench/compare.sh installs nginx-light)"
[[ $HAPROXY == 1 ]] && { command -v haproxy >/dev/null || die "haproxy not found (or HAPROXY=0)"; }
ON_PROXY=() ON_LOAD=()
if [[ $PIN == 1 && $(nproc) -ge 2 ]]; then ON_PROXY=(taskset -c "$PROXY_CPU") ON_LOAD=(taskset -c "$LOAD_CPU"); fi

COMMIT=unknown
[[ -f $PORTCULLIS_BIN.commit ]] && COMMIT=$(cat "$PORTCULLIS_BIN.commit")

rm -rf "$OUT"
mkdir -p "$OUT/nginx-tmp"
PIDS=()
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
for p in "$ORIGIN_PORT" "$PORTCULLIS_PORT" "$ADMIN_PORT" "$HAPROXY_PORT"; do
    port_busy "$p" && die "port $p is already in use"
done
rss_kib() { awk '$1 == "VmRSS:" {print $2}' "/proc/$1/status"; }
hwm_kib() { awk '$1 == "VmHWM:" {print $2}' "/proc/$1/status"; }

# The origin: bench/nginx.conf.tmpl, on its own port and directory.
OUT="$OUT" ORIGIN_PORT="$ORIGIN_PORT" python3 - "$BENCH/nginx.conf.tmpl" "$OUT/nginx.conf" <<'PY'
import os, re, sys
t = open(sys.argv[1]).read()
open(sys.argv[2], "w").write(re.sub(r"@([A-Z_]+)@", lambda m: os.environ.get(m.group(1), m.group(0)), t))
PY
"${ON_LOAD[@]}" "$NGINX_BIN" -c "$OUT/nginx.conf" -p "$OUT/" -e "$OUT/nginx-error.log" >"$OUT/nginx.log" 2>&1 &
PIDS+=($!)
wait_port "$ORIGIN_PORT" "$!" nginx

# wrk: a distinct X-Client per request from a counter. After KEYS responses the script prints
# its own count and ends wrk (wrk's main thread would otherwise sleep out its -d). Requests
# already sent by then wrap around to the first keys: no new entries.
cat >"$OUT/keys.lua" <<'LUA'
local n, i, done, bad = 1000000, 0, 0, 0
function init(args) n = tonumber(args[1]) end
function request()
    local k = i % n
    i = i + 1
    local a, b, c = math.floor(k / 65536) % 256, math.floor(k / 256) % 256, k % 256
    return wrk.format(nil, nil, { ["X-Client"] = string.format("10.%d.%d.%d", a, b, c) })
end
function response(status, headers, body)
    done = done + 1
    if status < 200 or status > 299 then bad = bad + 1 end
    if done >= n then
        io.stdout:write(string.format("keys_done %d non2xx %d\n", done, bad))
        io.stdout:flush()
        os.exit(0)
    end
end
LUA

declare -A RES=()
measure() { # name pid port count_cmd...: warm-up, RSS, KEYS keys, count, RSS
    local name=$1 pid=$2 port=$3
    shift 3
    "${ON_LOAD[@]}" wrk -t1 -c"$CONNS" -d"$WARMUP" "http://127.0.0.1:$port/" >"$OUT/warmup-$name.txt" 2>&1 \
        || die "wrk warm-up failed: $(cat "$OUT/warmup-$name.txt")"
    sleep 1
    local before before_hwm
    before=$(rss_kib "$pid") before_hwm=$(hwm_kib "$pid")
    log "$name: VmRSS $before KiB before; $KEYS requests with distinct X-Client values over $CONNS connections"
    local t0=$SECONDS
    "${ON_LOAD[@]}" wrk -t1 -c"$CONNS" -d600s -s "$OUT/keys.lua" "http://127.0.0.1:$port/" -- "$KEYS" >"$OUT/wrk-$name.txt" 2>&1 \
        || die "wrk failed: $(cat "$OUT/wrk-$name.txt")"
    local secs=$((SECONDS - t0))
    local sent bad
    read -r sent bad < <(awk '$1 == "keys_done" {print $2, $4}' "$OUT/wrk-$name.txt")
    [[ -n ${sent:-} ]] || die "$name: wrk ended before $KEYS responses: $(cat "$OUT/wrk-$name.txt")"
    ((bad == 0)) || die "$name: $bad answers were not 2xx"
    sleep 1
    local entries after hwm
    entries=$("$@") || die "$name: could not read the table's entry count"
    after=$(rss_kib "$pid") hwm=$(hwm_kib "$pid")
    log "$name: $entries entries; VmRSS $after KiB after (+$((after - before)) KiB), VmHWM $hwm KiB; $sent requests in ${secs}s"
    RES[$name]="$before $after $hwm $entries $sent $secs $before_hwm"
}

# ---- portcullis ------------------------------------------------------------------------
TOKEN=bench-$(od -An -N16 -tx1 /dev/urandom | tr -d ' \n')
cat >"$OUT/portcullis.yaml" <<EOF
# bench/table_memory.sh: one public route that counts every request in a table keyed by the
# X-Client header; one worker, no access log, no audit; an admin listener to read the table.
workers: 1
access_log: { path: "off" }
audit: { sink: "off" }
admin: { bind: "127.0.0.1:$ADMIN_PORT", tokens: ["$TOKEN"] }
listeners:
  - name: bench
    bind: "127.0.0.1:$PORTCULLIS_PORT"
stick_tables:
  - { name: per_client, key: "header:x-client", size: $SIZE, expire: 10m, store: ["http_req_rate(10s)", "http_err_rate(1m)", conn_cur] }
backends:
  - name: origin
    servers:
      - { name: nginx, address: "127.0.0.1:$ORIGIN_PORT" }
routes:
  - name: all
    match: { path_prefix: / }
    backend: origin
    public: true
    limits: { track: [per_client] }
EOF
"$PORTCULLIS_BIN" check --config "$OUT/portcullis.yaml" >"$OUT/portcullis.log" 2>&1 || die "portcullis config invalid: $(cat "$OUT/portcullis.log")"
"${ON_PROXY[@]}" env PORTCULLIS_LOG=warn "$PORTCULLIS_BIN" --log-format text run --config "$OUT/portcullis.yaml" >"$OUT/portcullis.log" 2>&1 &
PC_PID=$!; PIDS+=("$PC_PID")
wait_port "$PORTCULLIS_PORT" "$PC_PID" portcullis
wait_port "$ADMIN_PORT" "$PC_PID" portcullis
pc_entries() {
    curl -sS --max-time 10 -H "Authorization: Bearer $TOKEN" "http://127.0.0.1:$ADMIN_PORT/api/v1/tables" >"$OUT/portcullis-tables.json" || return 1
    python3 -c 'import json, sys; t = [t for t in json.load(open(sys.argv[1]))["tables"] if t["name"] == "per_client"][0]; print(t["entries"])' "$OUT/portcullis-tables.json"
}
measure portcullis "$PC_PID" "$PORTCULLIS_PORT" pc_entries
kill "$PC_PID"; wait "$PC_PID" 2>/dev/null || true

# ---- HAProxy ---------------------------------------------------------------------------
if [[ $HAPROXY == 1 ]]; then
    cat >"$OUT/haproxy.cfg" <<EOF
# bench/table_memory.sh: one frontend that tracks every request in a table keyed by the
# X-Client header; one thread, no logs; a stats socket to read the table.
global
    nbthread 1
    maxconn 4096
    stats socket $OUT/haproxy.sock mode 600 level admin
defaults
    mode http
    timeout connect 5s
    timeout client 60s
    timeout server 60s
    timeout http-request 10s
    timeout http-keep-alive 60s
    option http-keep-alive
    http-reuse always
frontend fe
    bind 127.0.0.1:$HAPROXY_PORT
    stick-table type string len 32 size $SIZE expire 10m store http_req_rate(10s),http_err_rate(1m),conn_cur
    http-request track-sc0 req.hdr(x-client)
    default_backend be
backend be
    server origin 127.0.0.1:$ORIGIN_PORT
EOF
    haproxy -c -q -f "$OUT/haproxy.cfg" >"$OUT/haproxy.log" 2>&1 || die "haproxy config invalid: $(cat "$OUT/haproxy.log")"
    "${ON_PROXY[@]}" haproxy -db -f "$OUT/haproxy.cfg" >"$OUT/haproxy.log" 2>&1 &
    HA_PID=$!; PIDS+=("$HA_PID")
    wait_port "$HAPROXY_PORT" "$HA_PID" haproxy
    ha_entries() {
        python3 - "$OUT/haproxy.sock" <<'PY'
import re, socket, sys
s = socket.socket(socket.AF_UNIX)
s.connect(sys.argv[1])
s.sendall(b"show table fe\n")
head = b""
while b"\n" not in head:
    b = s.recv(4096)
    if not b:
        break
    head += b
line = head.split(b"\n", 1)[0].decode()
print(re.search(r"used:(\d+)", line).group(1))
PY
    }
    measure haproxy "$HA_PID" "$HAPROXY_PORT" ha_entries
    kill "$HA_PID"; wait "$HA_PID" 2>/dev/null || true
fi

# ---- results ---------------------------------------------------------------------------
LOAD=$(cut -d' ' -f1-3 /proc/loadavg)
HAPROXY_VERSION=$(haproxy -v 2>/dev/null | head -1 | awk '{print $3}' || true)
for n in "${!RES[@]}"; do echo "$n ${RES[$n]}"; done >"$OUT/rows.txt"
KEYS=$KEYS SIZE=$SIZE CONNS=$CONNS COMMIT=$COMMIT LOAD=$LOAD HAPROXY_VERSION=$HAPROXY_VERSION \
    python3 - "$OUT/rows.txt" "$OUT/table-memory.json" <<'PY' | tee "$OUT/table-memory.md"
import datetime, json, os, sys
rows = {}
for line in open(sys.argv[1]):
    n, before, after, hwm, entries, sent, secs, before_hwm = line.split()
    r = rows[n] = {"rss_before_kib": int(before), "rss_after_kib": int(after), "hwm_after_kib": int(hwm),
                   "entries": int(entries), "requests": int(sent), "seconds": int(secs)}
    r["growth_kib"] = r["rss_after_kib"] - r["rss_before_kib"]
    r["bytes_per_entry"] = r["growth_kib"] * 1024 / r["entries"] if r["entries"] else None
keys = int(os.environ["KEYS"])
meta = {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "keys": keys, "size": int(os.environ["SIZE"]), "conns": int(os.environ["CONNS"]),
        "portcullis_commit": os.environ["COMMIT"], "haproxy": os.environ["HAPROXY_VERSION"],
        "loadavg_end": os.environ["LOAD"], "target_mb": 150}
json.dump({"meta": meta, "results": rows}, open(sys.argv[2], "w"), indent=2)
mb = lambda kib: kib * 1024 / 1e6
print(f"Stick table memory, {meta['date']}: portcullis {meta['portcullis_commit']}, HAProxy {meta['haproxy']}; "
      f"{keys:,} requests with distinct X-Client values over {meta['conns']} connections; table size {meta['size']:,}; "
      f"load average at the end {meta['loadavg_end']}.")
print()
print("| proxy | RSS before (MB) | RSS after (MB) | growth (MB) | entries held | bytes per entry (growth / entries) | time |")
print("|---|---:|---:|---:|---:|---:|---:|")
for n in ("portcullis", "haproxy"):
    if n not in rows:
        continue
    r = rows[n]
    print(f"| {n} | {mb(r['rss_before_kib']):.1f} | {mb(r['rss_after_kib']):.1f} | **{mb(r['growth_kib']):.1f}** | "
          f"{r['entries']:,} | {r['bytes_per_entry']:.0f} | {r['seconds']} s |")
if "portcullis" in rows:
    r = rows["portcullis"]
    print()
    print(f"Target, a table of {keys:,} keys ≤ 150 MB RSS: portcullis's whole process is at {mb(r['rss_after_kib']):.1f} MB "
          f"({'met' if mb(r['rss_after_kib']) <= 150 else 'not met'}), the table's growth {mb(r['growth_kib']):.1f} MB "
          f"({'met' if mb(r['growth_kib']) <= 150 else 'not met'}).")
    tables = os.path.join(os.path.dirname(sys.argv[2]), "portcullis-tables.json")
    if os.path.exists(tables):
        t = [t for t in json.load(open(tables))["tables"] if t["name"] == "per_client"][0]
        r["table_memory_bytes"] = t["memory_bytes"]
        json.dump({"meta": meta, "results": rows}, open(sys.argv[2], "w"), indent=2)
        print(f"The table's own account (`GET /api/v1/tables`): {t['entries']:,} entries, memory_bytes "
              f"{t['memory_bytes'] / 1e6:.1f} MB ({t['memory_bytes'] / max(t['entries'], 1):.0f} bytes per entry).")
PY
if [[ -f $OUT/portcullis-tables.json ]]; then
    log "portcullis GET /api/v1/tables: $(cat "$OUT/portcullis-tables.json")"
fi
