#!/usr/bin/env bash
# Soak test of portcullis (issue 18; not part of CI). Runs mixed traffic against a release
# build for DURATION and fails if the proxy's memory or file descriptors leak.
#
#   scripts/soak.sh [DURATION]        # like 30m (the default), 10m, 90s, 1h; at least 2m
#
# What runs, all on loopback, all started here and stopped on exit:
#   - portcullis (target/release/portcullis, built with `cargo build --release -p portcullis`);
#   - origins: nginx (Debian, plain HTTP) and a WebSocket echo server (Python, standard
#     library only); the real OpenID Provider of the tests (`node tests/idp/server.mjs`);
#   - traffic, concurrently, for DURATION:
#       * wrk with a Lua script, about SOAK_RATE (default 3000) requests/s over 32 keep-alive
#         connections (3% of requests say `Connection: close`, so connections churn too):
#         40% a public route, 45% a route that needs a JWT (SOAK_TOKENS distinct tokens of a
#         dev_issuer provider, default 5000, with a verified-token cache of 2000 so that it
#         evicts; a stick table per user), 15% a route that needs an OIDC browser session
#         (50 sealed session cookies from real logins at the IdP, made up front; the IdP's
#         tokens live 120 s, so the proxy refreshes them at the IdP all along). Paths are
#         random among about 350,000;
#       * 16 WebSocket clients (Python) through the proxy to the echo origin, each opening a
#         connection with a JWT, exchanging 1 to 40 messages (8 B to 20 KB, text and binary,
#         every echo checked), then closing it (1 in 10 drops the TCP connection without a
#         close frame), again and again;
#       * a browser (Python): a full OIDC login through the IdP's login and consent pages,
#         a few requests with the new session, a logout, a check that the old cookie no
#         longer opens, again and again;
#       * a config reload every 30 s: the config file is rewritten with a harmless change (the
#         public route's timeout alternates between 30s and 29s); the file watcher reloads it,
#         and every other time a SIGHUP is sent as well.
#   - every 10 s, the proxy's RSS (VmRSS of /proc/PID/status), its open descriptors
#     (/proc/PID/fd) and the requests it has counted (portcullis_requests_total on /metrics)
#     go to target/soak/samples.csv (elapsed_s,rss_kib,fds,requests_so_far). After the traffic
#     stops and 10 s pass, one more row is taken.
#
# Verdict (target/soak/summary.json, and one line on stdout). Warm-up is the first 20% of the
# run, at least 60 s. With W = max(3, 10% of the samples taken under traffic):
#   - RSS: the median of the last W samples may be at most 10% above the median of the first
#     W samples after warm-up;
#   - descriptors: the row taken after the traffic stopped may be at most 16 above the median
#     of the first W samples after warm-up;
#   - the traffic itself must have worked (the proxy stayed up, at most 1% of HTTP requests,
#     WebSocket connections and logins failed, no reload was rejected), otherwise the figures
#     say nothing.
# Exit 0: passed. Exit 1: failed. Exit 2: the soak could not run (missing tool, build error).
#
# Environment: SOAK_RATE (requests/s wrk aims at, default 3000), SOAK_TOKENS (distinct JWTs,
# default 5000), SOAK_WS_CLIENTS (default 16), SOAK_RELOAD_EVERY (seconds between config
# changes, default 30), SOAK_BIN (a portcullis binary to run instead of building one, such as
# a `--no-default-features` build with the system allocator for heaptrack). Logs and configs
# stay in target/soak/work/.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

usage() {
  echo "usage: scripts/soak.sh [DURATION]   (like 30m, 10m, 90s, 1h; default 30m; at least 2m)" >&2
  exit 2
}

die() {
  echo "soak: $*" >&2
  exit 2
}

arg=${1:-30m}
[[ $arg == -h || $arg == --help ]] && usage
if [[ $arg =~ ^([0-9]+)([smh])$ ]]; then
  n=${BASH_REMATCH[1]}
  case ${BASH_REMATCH[2]} in
    s) DURATION=$n ;;
    m) DURATION=$((n * 60)) ;;
    h) DURATION=$((n * 3600)) ;;
  esac
else
  usage
fi
((DURATION >= 120)) || die "a soak needs at least 2m (the warm-up alone is 60 s)"

RATE=${SOAK_RATE:-3000}
NTOKENS=${SOAK_TOKENS:-5000}
WS_CLIENTS=${SOAK_WS_CLIENTS:-16}
WRK_CONNS=32
NCOOKIES=50
SAMPLE_EVERY=10
RELOAD_EVERY=${SOAK_RELOAD_EVERY:-30}
SETTLE=10
FD_MARGIN=16

OUT=$ROOT/target/soak
WORK=$OUT/work

# --- tools -------------------------------------------------------------------------------

need_apt=()
command -v wrk >/dev/null 2>&1 || need_apt+=(wrk)
command -v nginx >/dev/null 2>&1 || [[ -x /usr/sbin/nginx ]] || need_apt+=(nginx-light)
command -v node >/dev/null 2>&1 || need_apt+=(nodejs)
command -v npm >/dev/null 2>&1 || need_apt+=(npm)
command -v python3 >/dev/null 2>&1 || need_apt+=(python3)
command -v curl >/dev/null 2>&1 || need_apt+=(curl)
if ((${#need_apt[@]})); then
  echo "soak: installing ${need_apt[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq || die "apt-get update failed"
  apt-get install -y -qq "${need_apt[@]}" || die "apt-get install ${need_apt[*]} failed"
fi
NGINX=$(command -v nginx || echo /usr/sbin/nginx)
if [[ ! -f tests/idp/node_modules/oidc-provider/package.json ]]; then
  echo "soak: installing the npm packages of tests/idp"
  npm ci --prefix tests/idp --no-audit --no-fund || die "npm ci in tests/idp failed"
fi
ulimit -n 65536 2>/dev/null || true

if [[ -n ${SOAK_BIN:-} ]]; then
  BIN=$SOAK_BIN
  [[ -x $BIN ]] || die "SOAK_BIN $BIN is not an executable"
else
  echo "soak: cargo build --release -p portcullis"
  cargo build --release -p portcullis || die "the release build failed"
  BIN=$ROOT/target/release/portcullis
fi
COMMIT=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)
if [[ -n $(git status --porcelain --untracked-files=no 2>/dev/null || true) ]]; then
  COMMIT="$COMMIT+dirty"
fi

rm -rf "$WORK"
mkdir -p "$WORK/nginx/tmp" "$WORK/proxy"
rm -f "$OUT/samples.csv" "$OUT/summary.json"

# --- process bookkeeping -------------------------------------------------------------------

PIDS=()      # every process started here, stopped in reverse order on exit
PROXY_PID=
stop_pid() {
  local pid=$1 i
  kill -0 "$pid" 2>/dev/null || return 0
  kill -TERM "$pid" 2>/dev/null || true
  for ((i = 0; i < 100; i++)); do
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.1
  done
  kill -KILL "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
}
# shellcheck disable=SC2317 # called by the EXIT trap
cleanup() {
  local i
  trap - EXIT
  for ((i = ${#PIDS[@]} - 1; i >= 0; i--)); do
    stop_pid "${PIDS[i]}"
  done
}
trap cleanup EXIT
trap 'exit 130' INT TERM

wait_http() { # URL SECONDS
  local i
  for ((i = 0; i < $2 * 10; i++)); do
    curl -s -o /dev/null --max-time 1 "$1" && return 0
    sleep 0.1
  done
  return 1
}

# --- helper programs, written out here so that the script is the only file ----------------

cat >"$WORK/soak.py" <<'PY'
"""Helpers of scripts/soak.sh: WebSocket origin and clients, an OIDC browser, the verdict.
Standard library only."""
import argparse
import asyncio
import base64
import contextlib
import hashlib
import html
import http.client
import json
import math
import os
import random
import re
import socket
import statistics
import sys
import time
import urllib.parse

GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


def free_ports(n):
    socks = []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    print(" ".join(map(str, ports)))


# --- WebSocket framing (RFC 6455) -----------------------------------------------------------

def accept_key(key):
    return base64.b64encode(hashlib.sha1(key + GUID).digest()).decode()


def xor_mask(data, mask):
    n = len(data)
    if n == 0:
        return data
    m = (mask * (n // 4 + 1))[:n]
    return (int.from_bytes(data, "big") ^ int.from_bytes(m, "big")).to_bytes(n, "big")


def frame(op, payload, masked):
    b1 = 0x80 if masked else 0
    n = len(payload)
    if n < 126:
        head = bytes([0x80 | op, b1 | n])
    elif n < 65536:
        head = bytes([0x80 | op, b1 | 126]) + n.to_bytes(2, "big")
    else:
        head = bytes([0x80 | op, b1 | 127]) + n.to_bytes(8, "big")
    if masked:
        key = os.urandom(4)
        return head + key + xor_mask(payload, key)
    return head + payload


async def read_frame(reader):
    h = await reader.readexactly(2)
    op = h[0] & 0x0F
    n = h[1] & 0x7F
    if n == 126:
        n = int.from_bytes(await reader.readexactly(2), "big")
    elif n == 127:
        n = int.from_bytes(await reader.readexactly(8), "big")
    if n > 1 << 20:
        raise ValueError("frame too large")
    key = await reader.readexactly(4) if h[1] & 0x80 else None
    data = await reader.readexactly(n)
    return op, (xor_mask(data, key) if key else data)


def parse_head(raw):
    lines = raw.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines[1:]:
        if ":" in line:
            k, v = line.split(":", 1)
            headers[k.strip().lower()] = v.strip()
    return lines[0], headers


# --- the WebSocket echo origin --------------------------------------------------------------

async def origin_conn(reader, writer):
    try:
        first, headers = parse_head(await reader.readuntil(b"\r\n\r\n"))
        if headers.get("upgrade", "").lower() != "websocket":
            body = b"websocket echo origin\n"
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: %d\r\n"
                         b"Connection: close\r\n\r\n%s" % (len(body), body))
            await writer.drain()
            return
        acc = accept_key(headers["sec-websocket-key"].encode())
        writer.write(("HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                      "Connection: Upgrade\r\nSec-WebSocket-Accept: %s\r\n\r\n" % acc).encode())
        await writer.drain()
        while True:
            op, data = await read_frame(reader)
            if op == 8:
                writer.write(frame(8, data[:2], False))
                await writer.drain()
                break
            if op == 9:
                writer.write(frame(10, data, False))
            elif op in (1, 2):
                writer.write(frame(op, data, False))
            await writer.drain()
    except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError, ValueError,
            KeyError):
        pass
    finally:
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()


async def ws_origin(port):
    server = await asyncio.start_server(origin_conn, "127.0.0.1", port, limit=1 << 16)
    async with server:
        await server.serve_forever()


# --- the WebSocket clients ------------------------------------------------------------------

class WsStats:
    def __init__(self):
        self.opened = self.closed = self.dropped = self.messages = self.failed = 0
        self.bytes = 0
        self.last_error = ""

    def dump(self, path):
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(self.__dict__, f)
        os.replace(tmp, path)


SIZES = [8, 100, 1000, 4000, 20000]


async def ws_session(port, tokens, st, rnd):
    reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 10)
    try:
        key = base64.b64encode(os.urandom(16))
        writer.write((
            f"GET /ws/room/{rnd.randrange(100000)} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
            "Upgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {key.decode()}\r\nSec-WebSocket-Version: 13\r\n"
            f"Authorization: Bearer {rnd.choice(tokens)}\r\n\r\n").encode())
        await writer.drain()
        first, headers = parse_head(await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10))
        if " 101 " not in first + " ":
            raise RuntimeError(f"handshake answered {first!r}")
        if headers.get("sec-websocket-accept") != accept_key(key):
            raise RuntimeError("wrong Sec-WebSocket-Accept")
        st.opened += 1
        for _ in range(rnd.randint(1, 40)):
            size = rnd.choice(SIZES)
            if rnd.random() < 0.5:
                op, payload = 1, base64.b64encode(os.urandom(size))[:size]
            else:
                op, payload = 2, os.urandom(size)
            writer.write(frame(op, payload, True))
            await writer.drain()
            rop, data = await asyncio.wait_for(read_frame(reader), 10)
            if rop != op or data != payload:
                raise RuntimeError(f"echo differs (opcode {rop}, {len(data)} bytes)")
            st.messages += 1
            st.bytes += size
            await asyncio.sleep(rnd.uniform(0, 0.1))
        if rnd.random() < 0.1:
            st.dropped += 1  # no close frame: the TCP connection just goes away
            return
        writer.write(frame(8, (1000).to_bytes(2, "big"), True))
        await writer.drain()
        rop, _ = await asyncio.wait_for(read_frame(reader), 10)
        if rop != 8:
            raise RuntimeError(f"expected a close frame, got opcode {rop}")
        st.closed += 1
    finally:
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()


async def ws_clients(port, token_file, n, duration, stats_path):
    with open(token_file) as f:
        tokens = [l.strip() for l in f if l.strip()]
    st = WsStats()
    deadline = time.monotonic() + duration

    async def loop(i):
        rnd = random.Random(i * 7919 + int(time.time()))
        while time.monotonic() < deadline:
            try:
                await ws_session(port, tokens, st, rnd)
            except Exception as e:  # noqa: BLE001 - every failure counts
                st.failed += 1
                st.last_error = f"{type(e).__name__}: {e}"
                await asyncio.sleep(0.5)

    async def dumper():
        while True:
            st.dump(stats_path)
            await asyncio.sleep(5)

    d = asyncio.create_task(dumper())
    await asyncio.gather(*(loop(i) for i in range(n)))
    d.cancel()
    st.dump(stats_path)


# --- an OIDC browser ------------------------------------------------------------------------

FORM_RE = re.compile(r'(?s)<form[^>]*action="([^"]+)"[^>]*>(.*?)</form>')
PROMPT_RE = re.compile(r'name="prompt" value="([a-z]+)"')
HTML_ACCEPT = "text/html,application/xhtml+xml,*/*;q=0.8"


class Browser:
    """No automatic redirects; one cookie jar for 127.0.0.1, whatever the port, as a browser."""

    def __init__(self):
        self.jar = {}  # (name, path) -> value

    def cookie(self, name):
        for (n, _), v in self.jar.items():
            if n == name:
                return v
        return None

    def store(self, msg):
        for line in msg.get_all("Set-Cookie") or []:
            parts = line.split(";")
            name, _, value = parts[0].partition("=")
            name, value = name.strip(), value.strip()
            path, gone = "/", value == ""
            for a in parts[1:]:
                k, _, v = a.partition("=")
                k = k.strip().lower()
                if k == "path":
                    path = v.strip()
                elif k == "max-age":
                    with contextlib.suppress(ValueError):
                        gone |= int(v.strip()) <= 0
                elif k == "expires":
                    gone |= "1970" in v
            self.jar.pop((name, path), None)
            if not gone:
                self.jar[(name, path)] = value

    def send(self, method, url, form=None, html_nav=True, cookies=True):
        u = urllib.parse.urlsplit(url)
        conn = http.client.HTTPConnection(u.hostname, u.port, timeout=20)
        headers = {}
        if html_nav:
            headers["Accept"] = HTML_ACCEPT
        if cookies:
            c = "; ".join(f"{n}={v}" for (n, p), v in self.jar.items()
                          if p == "/" or u.path.startswith(p))
            if c:
                headers["Cookie"] = c
        body = None
        if form is not None:
            body = urllib.parse.urlencode(form)
            headers["Content-Type"] = "application/x-www-form-urlencoded"
        try:
            conn.request(method, u.path + ("?" + u.query if u.query else ""), body, headers)
            resp = conn.getresponse()
            data = resp.read().decode("utf-8", "replace")
        finally:
            conn.close()
        self.store(resp.msg)
        loc = resp.getheader("Location")
        return resp.status, (urllib.parse.urljoin(url, loc) if loc else None), data

    def login(self, proxy, issuer, path, user):
        status, url, body = self.send("GET", proxy + path)
        if status != 302 or not url or not url.startswith(issuer):
            raise RuntimeError(f"{path}: expected a redirect to the IdP, got {status}")
        for _ in range(20):
            status, nxt, body = self.send("GET", url)
            if status in (302, 303):
                if not nxt.startswith(issuer):
                    break
                url = nxt
                continue
            if status != 200:
                raise RuntimeError(f"IdP answered {status} at {url}")
            m = FORM_RE.search(body)
            p = PROMPT_RE.search(m.group(2)) if m else None
            if not p:
                raise RuntimeError(f"no login form at {url}")
            action = urllib.parse.urljoin(url, html.unescape(m.group(1)))
            if p.group(1) == "login":
                form = {"prompt": "login", "login": user, "password": "x"}
            else:
                form = {"prompt": p.group(1)}
            status, url, _ = self.send("POST", action, form=form)
            if status not in (302, 303):
                raise RuntimeError(f"{p.group(1)} form answered {status}")
        else:
            raise RuntimeError("too many redirects at the IdP")
        if not nxt.startswith(proxy + "/.portcullis/callback?"):
            raise RuntimeError(f"the IdP sent the browser to {nxt}")
        status, back, body = self.send("GET", nxt)
        if status != 302 or self.cookie("portcullis_session") is None:
            raise RuntimeError(f"callback answered {status}: {body[:200]}")
        status, _, _ = self.send("GET", back)
        if status != 200:
            raise RuntimeError(f"after the login, {back} answered {status}")
        return self.cookie("portcullis_session")


def logins(proxy, issuer, count, out):
    cookies = []
    for i in range(count):
        cookies.append(Browser().login(proxy, issuer, f"/app/start/{i}", f"soak{i}"))
    with open(out, "w") as f:
        f.write("\n".join(cookies) + "\n")


def browser_loop(proxy, issuer, duration, stats_path):
    st = {"logins": 0, "login_failures": 0, "requests": 0, "request_failures": 0,
          "logouts": 0, "revoked_checked": 0, "revocation_failures": 0, "last_error": ""}
    rnd = random.Random()
    deadline = time.monotonic() + duration

    def dump():
        with open(stats_path + ".tmp", "w") as f:
            json.dump(st, f)
        os.replace(stats_path + ".tmp", stats_path)

    n = 0
    while time.monotonic() < deadline:
        n += 1
        b = Browser()
        try:
            cookie = b.login(proxy, issuer, f"/app/loop/{n}", f"user{rnd.randrange(500)}")
            st["logins"] += 1
        except Exception as e:  # noqa: BLE001
            st["login_failures"] += 1
            st["last_error"] = f"login: {type(e).__name__}: {e}"
            dump()
            time.sleep(2)
            continue
        for _ in range(rnd.randint(5, 20)):
            status, _, _ = b.send("GET", f"{proxy}/app/p/{rnd.randrange(100000)}", html_nav=False)
            st["requests"] += 1
            if status != 200:
                st["request_failures"] += 1
                st["last_error"] = f"session request answered {status}"
        status, _, _ = b.send("GET", f"{proxy}/.portcullis/logout?rd=/app/bye")
        if status == 302:
            st["logouts"] += 1
        old = Browser()
        old.jar[("portcullis_session", "/")] = cookie
        status, _, _ = old.send("GET", f"{proxy}/app/after-logout", html_nav=False)
        st["revoked_checked"] += 1
        if status != 401:
            st["revocation_failures"] += 1
            st["last_error"] = f"a logged-out cookie answered {status}"
        dump()
        time.sleep(rnd.uniform(0.5, 2))
    dump()


# --- the verdict ----------------------------------------------------------------------------

def load_json(path, default):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return default


def analyze(a):
    rows = []
    with open(a.samples) as f:
        next(f)
        for line in f:
            e, r, d, q = line.strip().split(",")
            rows.append((int(e), int(r), int(d), int(q)))
    traffic = [r for r in rows if r[0] <= a.duration]
    after = [r for r in rows if r[0] > a.duration]
    warmup = max(60, math.ceil(0.2 * a.duration))
    w = max(3, math.ceil(0.1 * len(traffic)))
    post = [r for r in traffic if r[0] >= warmup][:w]
    end = traffic[-w:]
    wrk = load_json(a.wrk, {})
    ws = load_json(a.ws, {})
    br = load_json(a.browser, {})
    base = load_json(a.baseline, {})
    reasons = []
    if a.proxy_died:
        reasons.append("the proxy exited during the soak")
    if len(post) < 3 or not end or not after:
        reasons.append("too few samples")
        post = post or traffic[:1]
        end = end or traffic[-1:]
        after = after or traffic[-1:]
    rss_warm = statistics.median(r[1] for r in post)
    rss_end = statistics.median(r[1] for r in end)
    growth = 100.0 * (rss_end - rss_warm) / rss_warm
    fds_warm = statistics.median(r[2] for r in post)
    fds_rest = after[-1][2]
    # Least-squares slope of RSS after warm-up, for information.
    pts = [(r[0], r[1]) for r in traffic if r[0] >= warmup]
    slope = 0.0
    if len(pts) >= 2:
        mx = sum(p[0] for p in pts) / len(pts)
        my = sum(p[1] for p in pts) / len(pts)
        den = sum((p[0] - mx) ** 2 for p in pts)
        slope = 60 * sum((p[0] - mx) * (p[1] - my) for p in pts) / den if den else 0.0
    if growth > 10.0:
        reasons.append(f"RSS grew {growth:.1f}% after warm-up (limit 10%)")
    if fds_rest > fds_warm + a.fd_margin:
        reasons.append(f"{fds_rest} descriptors open at rest, more than {fds_warm:g} after "
                       f"warm-up + {a.fd_margin}")
    http_total = wrk.get("requests", 0)
    http_bad = wrk.get("non_2xx", 0) + wrk.get("socket_errors", 0)
    if http_total == 0:
        reasons.append("wrk made no requests")
    elif http_bad > 0.01 * http_total:
        reasons.append(f"{http_bad} of {http_total} HTTP requests failed")
    ws_total = ws.get("opened", 0) + ws.get("failed", 0)
    if ws_total == 0 or ws.get("failed", 0) > 0.01 * ws_total:
        reasons.append(f"{ws.get('failed', 0)} of {ws_total} WebSocket connections failed "
                       f"({ws.get('last_error', '')})")
    lg = br.get("logins", 0) + br.get("login_failures", 0)
    if lg == 0 or br.get("login_failures", 0) > 0.01 * lg or br.get("revocation_failures", 0):
        reasons.append(f"browser: {br.get('login_failures', 0)} of {lg} logins failed, "
                       f"{br.get('revocation_failures', 0)} logged-out cookies still opened "
                       f"({br.get('last_error', '')})")
    if a.reload_errors:
        reasons.append(f"{a.reload_errors} reloads were rejected")
    if a.reloads_ok < a.reload_ticks - 1:
        reasons.append(f"{a.reloads_ok} reloads applied of {a.reload_ticks} config changes")
    verdict = "fail" if reasons else "pass"
    requests = traffic[-1][3] if traffic else 0
    summary = {
        "verdict": verdict,
        "reasons": reasons,
        "date": time.strftime("%Y-%m-%d"),
        "commit": a.commit,
        "duration_s": a.duration,
        "warmup_s": warmup,
        "window_samples": w,
        "samples": len(rows),
        "rss_kib": {"before_traffic": base.get("rss_kib"), "after_warmup_median": rss_warm,
                    "end_median": rss_end, "growth_pct": round(growth, 2),
                    "slope_after_warmup_kib_per_min": round(slope, 1), "at_rest": after[-1][1],
                    "max": max(r[1] for r in rows)},
        "fds": {"before_traffic": base.get("fds"), "after_warmup_median": fds_warm,
                "end_median": statistics.median(r[2] for r in end), "at_rest": fds_rest,
                "margin": a.fd_margin, "max": max(r[2] for r in rows)},
        "proxy_requests": requests,
        "proxy_requests_per_s": round(requests / a.duration, 1),
        "wrk": wrk,
        "websocket": ws,
        "browser": br,
        "reloads": {"config_changes": a.reload_ticks, "applied": a.reloads_ok,
                    "rejected": a.reload_errors, "sighups": a.sighups},
    }
    with open(a.out, "w") as f:
        json.dump(summary, f, indent=2)
        f.write("\n")
    mib = lambda k: f"{k / 1024:.1f} MiB"  # noqa: E731
    print(f"soak {a.label}: {verdict.upper()}: RSS {mib(rss_warm)} after warm-up -> "
          f"{mib(rss_end)} at the end ({growth:+.1f}%, limit +10%); fds {fds_warm:g} after "
          f"warm-up -> {fds_rest} at rest (limit {fds_warm + a.fd_margin:g}); "
          f"{requests} requests ({requests / a.duration:.0f}/s), "
          f"{ws.get('opened', 0)} WebSocket connections ({ws.get('messages', 0)} messages), "
          f"{br.get('logins', 0)} logins, {a.reloads_ok} reloads"
          + (": " + "; ".join(reasons) if reasons else ""))
    return 0 if verdict == "pass" else 1


def main():
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("free-ports")
    s.add_argument("n", type=int)
    s = sub.add_parser("ws-origin")
    s.add_argument("port", type=int)
    s = sub.add_parser("ws-clients")
    s.add_argument("--port", type=int, required=True)
    s.add_argument("--tokens", required=True)
    s.add_argument("--clients", type=int, required=True)
    s.add_argument("--duration", type=float, required=True)
    s.add_argument("--stats", required=True)
    s = sub.add_parser("logins")
    s.add_argument("--proxy", required=True)
    s.add_argument("--issuer", required=True)
    s.add_argument("--count", type=int, required=True)
    s.add_argument("--out", required=True)
    s = sub.add_parser("browser")
    s.add_argument("--proxy", required=True)
    s.add_argument("--issuer", required=True)
    s.add_argument("--duration", type=float, required=True)
    s.add_argument("--stats", required=True)
    s = sub.add_parser("analyze")
    for k in ("samples", "wrk", "ws", "browser", "baseline", "out", "commit", "label"):
        s.add_argument("--" + k, required=True)
    for k in ("duration", "fd-margin", "reload-ticks", "reloads-ok", "reload-errors",
              "sighups", "proxy-died"):
        s.add_argument("--" + k, type=int, required=True)
    a = p.parse_args()
    if a.cmd == "free-ports":
        free_ports(a.n)
    elif a.cmd == "ws-origin":
        asyncio.run(ws_origin(a.port))
    elif a.cmd == "ws-clients":
        asyncio.run(ws_clients(a.port, a.tokens, a.clients, a.duration, a.stats))
    elif a.cmd == "logins":
        logins(a.proxy, a.issuer, a.count, a.out)
    elif a.cmd == "browser":
        browser_loop(a.proxy, a.issuer, a.duration, a.stats)
    elif a.cmd == "analyze":
        sys.exit(analyze(a))


if __name__ == "__main__":
    main()
PY

cat >"$WORK/mix.lua" <<'LUA'
-- wrk script of scripts/soak.sh: public, bearer-token and session requests on random paths.
local threads = {}

local function lines(path)
  local t = {}
  for l in io.lines(path) do
    if #l > 0 then t[#t + 1] = l end
  end
  return t
end

function setup(thread)
  thread:set("id", #threads + 1)
  threads[#threads + 1] = thread
end

function init(args)
  tokens = lines(os.getenv("SOAK_TOKEN_FILE"))
  cookies = lines(os.getenv("SOAK_COOKIE_FILE"))
  pause = tonumber(os.getenv("SOAK_DELAY_MS"))
  math.randomseed(os.time() * 100 + id)
  n_pub, n_api, n_app, n_close = 0, 0, 0, 0
  s1, s2, s3, s4, s5 = 0, 0, 0, 0, 0
end

function request()
  local h = {}
  if math.random(100) <= 3 then
    h["Connection"] = "close"
    n_close = n_close + 1
  end
  local r = math.random(100)
  local path
  if r <= 40 then
    path = "/pub/" .. math.random(1, 200000)
    n_pub = n_pub + 1
  elseif r <= 85 then
    path = "/api/items/" .. math.random(1, 100000) .. "?page=" .. math.random(1, 20)
    h["Authorization"] = "Bearer " .. tokens[math.random(#tokens)]
    n_api = n_api + 1
  else
    path = "/app/page/" .. math.random(1, 50000)
    h["Cookie"] = "portcullis_session=" .. cookies[math.random(#cookies)]
    n_app = n_app + 1
  end
  return wrk.format("GET", path, h)
end

function delay()
  return pause
end

function response(status, headers, body)
  if status < 200 then s1 = s1 + 1
  elseif status < 300 then s2 = s2 + 1
  elseif status < 400 then s3 = s3 + 1
  elseif status < 500 then s4 = s4 + 1
  else s5 = s5 + 1 end
end

function done(summary, latency, requests)
  local t = {pub = 0, api = 0, app = 0, close = 0, s1 = 0, s2 = 0, s3 = 0, s4 = 0, s5 = 0}
  for _, th in ipairs(threads) do
    t.pub = t.pub + th:get("n_pub")
    t.api = t.api + th:get("n_api")
    t.app = t.app + th:get("n_app")
    t.close = t.close + th:get("n_close")
    t.s1 = t.s1 + th:get("s1")
    t.s2 = t.s2 + th:get("s2")
    t.s3 = t.s3 + th:get("s3")
    t.s4 = t.s4 + th:get("s4")
    t.s5 = t.s5 + th:get("s5")
  end
  local e = summary.errors
  local f = assert(io.open(os.getenv("SOAK_WRK_JSON"), "w"))
  f:write(string.format(
    '{"requests": %d, "seconds": %.1f, "per_s": %.1f, "non_2xx": %d, "socket_errors": %d, ' ..
    '"errors": {"connect": %d, "read": %d, "write": %d, "timeout": %d}, ' ..
    '"status": {"1xx": %d, "2xx": %d, "3xx": %d, "4xx": %d, "5xx": %d}, ' ..
    '"sent": {"public": %d, "jwt": %d, "session": %d, "connection_close": %d}, ' ..
    '"latency_ms": {"p50": %.2f, "p99": %.2f, "max": %.2f}}\n',
    summary.requests, summary.duration / 1e6, summary.requests / (summary.duration / 1e6),
    t.s1 + t.s3 + t.s4 + t.s5, e.connect + e.read + e.write + e.timeout,
    e.connect, e.read, e.write, e.timeout, t.s1, t.s2, t.s3, t.s4, t.s5,
    t.pub, t.api, t.app, t.close,
    latency:percentile(50) / 1000, latency:percentile(99) / 1000, latency.max / 1000))
  f:close()
end
LUA

read -r P_WEB P_ADMIN P_NGINX P_WS < <(python3 "$WORK/soak.py" free-ports 4)

# --- origins -------------------------------------------------------------------------------

cat >"$WORK/nginx/nginx.conf" <<EOF
worker_processes 1;
daemon off;
pid $WORK/nginx/nginx.pid;
error_log $WORK/nginx/error.log warn;
events { worker_connections 4096; }
http {
  access_log off;
  client_body_temp_path $WORK/nginx/tmp/body;
  proxy_temp_path $WORK/nginx/tmp/proxy;
  fastcgi_temp_path $WORK/nginx/tmp/fastcgi;
  uwsgi_temp_path $WORK/nginx/tmp/uwsgi;
  scgi_temp_path $WORK/nginx/tmp/scgi;
  keepalive_timeout 120s;
  server {
    listen 127.0.0.1:$P_NGINX;
    location / {
      default_type text/plain;
      return 200 "origin: \$request_uri\n";
    }
  }
}
EOF
"$NGINX" -p "$WORK/nginx" -e "$WORK/nginx/error.log" -c "$WORK/nginx/nginx.conf" \
  </dev/null >"$WORK/nginx/stdout.log" 2>&1 &
PIDS+=($!)
wait_http "http://127.0.0.1:$P_NGINX/" 10 || die "nginx did not start: $(cat "$WORK/nginx/error.log")"

python3 "$WORK/soak.py" ws-origin "$P_WS" </dev/null >"$WORK/ws-origin.log" 2>&1 &
PIDS+=($!)
wait_http "http://127.0.0.1:$P_WS/" 10 || die "the WebSocket origin did not start: $(cat "$WORK/ws-origin.log")"

# The IdP: access and ID tokens live 120 s, so the proxy refreshes sessions during the soak.
IDP_CLIENT_ID=portcullis IDP_CLIENT_SECRET=portcullis-test-secret \
  IDP_ACCESS_TOKEN_TTL=120 IDP_ID_TOKEN_TTL=120 \
  node tests/idp/server.mjs --port 0 --control-port 0 </dev/null >"$WORK/idp.out" 2>"$WORK/idp.log" &
PIDS+=($!)
ready=
for ((i = 0; i < 300; i++)); do
  ready=$(grep -m1 '^ready ' "$WORK/idp.out" 2>/dev/null || true)
  [[ -n $ready ]] && break
  sleep 0.1
done
[[ -n $ready ]] || die "the IdP did not start: $(cat "$WORK/idp.log")"
ISSUER=$(sed -E 's/.* issuer=([^ ]+).*/\1/' <<<"$ready")
IDP_CONTROL=$(sed -E 's/.* control=([^ ]+).*/\1/' <<<"$ready")
PROXY=http://127.0.0.1:$P_WEB
curl -sf -X POST "$IDP_CONTROL/client" -H 'content-type: application/json' \
  -d "{\"redirect_uris\": [\"$PROXY/.portcullis/callback\"], \"post_logout_redirect_uris\": [\"$PROXY/app/bye\"]}" \
  >/dev/null || die "could not register the proxy's callback at the IdP"

# --- the proxy -----------------------------------------------------------------------------

ADMIN_TOKEN=$(head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n')
ADMIN_DIGEST=$(printf %s "$ADMIN_TOKEN" | sha256sum | cut -d' ' -f1)
SESSION_KEY=$(head -c 32 /dev/urandom | base64)
CONFIG=$WORK/proxy/portcullis.yaml

write_config() { # GENERATION
  local timeout=30s
  (($1 % 2)) && timeout=29s
  cat >"$CONFIG.tmp" <<EOF
# Written by scripts/soak.sh, generation $1.
listeners: [{ name: web, bind: "127.0.0.1:$P_WEB" }]
admin: { bind: "127.0.0.1:$P_ADMIN", tokens: ["sha256:$ADMIN_DIGEST"] }
access_log: { path: access.log, format: json, sample: 0.01 }
audit: { dir: audit, record_allows: false }
shutdown_grace: 5s
stick_tables:
  - { name: per_user, key: principal, size: 2000, expire: 1m, store: [http_req_rate(10s), http_req_cnt] }
identity:
  providers:
    - { name: dev, kind: dev_issuer, cache_size: 2000 }
    - name: corp
      kind: oidc
      issuer: "$ISSUER"
      client_id: portcullis
      client_secret: portcullis-test-secret
      scopes: [openid, email, groups]
      claims: { user: sub, email: email, groups: groups }
  session: { keys: ["$SESSION_KEY"], secure: false }
backends:
  - { name: static, servers: [{ name: nginx, address: "127.0.0.1:$P_NGINX" }] }
  - { name: ws, servers: [{ name: ws-echo, address: "127.0.0.1:$P_WS" }] }
routes:
  - name: public
    match: { path_prefix: /pub/ }
    backend: static
    public: true
    timeout: $timeout
  - name: api
    match: { path_prefix: /api/ }
    backend: static
    auth: [dev]
    allow: [{ providers: [dev] }]
    limits: { track: [per_user] }
    headers:
      upstream: { X-User: "{identity.user}" }
      assertion: true
  - name: ws
    match: { path_prefix: /ws/ }
    backend: ws
    auth: [dev]
    allow: [{ providers: [dev] }]
  - name: app
    match: { path_prefix: /app/ }
    backend: static
    auth: [corp]
    allow: [{ providers: [corp] }]
    headers:
      upstream: { X-User: "{identity.user}", X-Groups: "{identity.groups}" }
EOF
  mv -f "$CONFIG.tmp" "$CONFIG"
}
write_config 0
"$BIN" check --config "$CONFIG" >"$WORK/check.log" 2>&1 || die "portcullis check failed: $(cat "$WORK/check.log")"

"$BIN" run --config "$CONFIG" --log-format json </dev/null >"$WORK/proxy/stdout.log" 2>"$WORK/proxy/proxy.log" &
PROXY_PID=$!
PIDS+=("$PROXY_PID")
wait_http "http://127.0.0.1:$P_ADMIN/readyz" 30 || die "the proxy did not start: $(tail -5 "$WORK/proxy/proxy.log")"

metrics() {
  curl -s --max-time 5 -H "Authorization: Bearer $ADMIN_TOKEN" "http://127.0.0.1:$P_ADMIN/metrics" || true
}
requests_so_far() {
  metrics | awk '/^portcullis_requests_total\{/ { s += $NF } END { printf "%d", s }'
}
reloads() { # RESULT
  metrics | awk -v r="$1" '$0 ~ "^portcullis_config_reloads_total\\{result=\"" r "\"\\}" { s += $NF } END { printf "%d", s }'
}

# --- credentials -----------------------------------------------------------------------------

TTL=$((DURATION / 60 + 60))m
echo "soak: minting $NTOKENS tokens"
seq 1 "$NTOKENS" | xargs -P 2 -I{} "$BIN" token --config "$CONFIG" --provider dev --user "u{}" --ttl "$TTL" \
  >"$WORK/tokens.txt" 2>"$WORK/tokens.log" || die "portcullis token failed: $(tail -3 "$WORK/tokens.log")"
[[ $(wc -l <"$WORK/tokens.txt") -eq $NTOKENS ]] || die "expected $NTOKENS tokens in $WORK/tokens.txt"
echo "soak: $NCOOKIES browser logins at the IdP"
python3 "$WORK/soak.py" logins --proxy "$PROXY" --issuer "$ISSUER" --count "$NCOOKIES" \
  --out "$WORK/cookies.txt" || die "the browser logins failed"
code=$(curl -s -o /dev/null -w '%{http_code}' "$PROXY/api/check" -H "Authorization: Bearer $(head -1 "$WORK/tokens.txt")")
[[ $code == 200 ]] || die "a token was refused: $code"
code=$(curl -s -o /dev/null -w '%{http_code}' "$PROXY/app/check" -H "Cookie: portcullis_session=$(head -1 "$WORK/cookies.txt")")
[[ $code == 200 ]] || die "a session was refused: $code"

# --- the soak ------------------------------------------------------------------------------

rss_of() { awk '/^VmRSS:/ { print $2 }' "/proc/$PROXY_PID/status" 2>/dev/null || true; }
fds_of() { find "/proc/$PROXY_PID/fd" -mindepth 1 -maxdepth 1 2>/dev/null | wc -l; }
printf '{"rss_kib": %s, "fds": %s}\n' "$(rss_of)" "$(fds_of)" >"$WORK/baseline.json"

echo "soak: $arg of traffic (samples every ${SAMPLE_EVERY}s in target/soak/samples.csv)"
DELAY_MS=$((WRK_CONNS * 1000 / RATE))
SOAK_TOKEN_FILE=$WORK/tokens.txt SOAK_COOKIE_FILE=$WORK/cookies.txt SOAK_DELAY_MS=$DELAY_MS \
  SOAK_WRK_JSON=$WORK/wrk.json \
  wrk -t 2 -c "$WRK_CONNS" -d "${DURATION}s" --timeout 10s -s "$WORK/mix.lua" "$PROXY" \
  </dev/null >"$WORK/wrk.log" 2>&1 &
WRK_PID=$!
PIDS+=("$WRK_PID")
python3 "$WORK/soak.py" ws-clients --port "$P_WEB" --tokens "$WORK/tokens.txt" \
  --clients "$WS_CLIENTS" --duration "$DURATION" --stats "$WORK/ws.json" </dev/null >"$WORK/ws-clients.log" 2>&1 &
WS_PID=$!
PIDS+=("$WS_PID")
python3 "$WORK/soak.py" browser --proxy "$PROXY" --issuer "$ISSUER" --duration "$DURATION" \
  --stats "$WORK/browser.json" </dev/null >"$WORK/browser.log" 2>&1 &
BROWSER_PID=$!
PIDS+=("$BROWSER_PID")

T0=$(date +%s)
echo "elapsed_s,rss_kib,fds,requests_so_far" >"$OUT/samples.csv"
sample() { # ELAPSED
  local rss fds
  rss=$(rss_of)
  fds=$(fds_of)
  [[ -n $rss ]] || return 1
  echo "$1,$rss,$fds,$(requests_so_far)" >>"$OUT/samples.csv"
  printf 'soak: %5ss  rss %s KiB  fds %s\n' "$1" "$rss" "$fds"
}

proxy_died=0
gen=0
sighups=0
next_sample=0
next_reload=$RELOAD_EVERY
while :; do
  now=$(($(date +%s) - T0))
  if ((now >= next_sample)); then
    if ! kill -0 "$PROXY_PID" 2>/dev/null || ! sample "$next_sample"; then
      proxy_died=1
      echo "soak: the proxy exited at ${now}s: $(tail -3 "$WORK/proxy/proxy.log")" >&2
      break
    fi
    next_sample=$((next_sample + SAMPLE_EVERY))
  fi
  if ((now >= next_reload && next_reload < DURATION)); then
    gen=$((gen + 1))
    write_config "$gen"
    if ((gen % 2 == 0)); then
      kill -HUP "$PROXY_PID" 2>/dev/null || true
      sighups=$((sighups + 1))
    fi
    next_reload=$((next_reload + RELOAD_EVERY))
  fi
  ((next_sample > DURATION)) && break
  sleep 1
done

# The traffic ends on its own at DURATION; give it a little longer, then stop it.
for pid in "$WRK_PID" "$WS_PID" "$BROWSER_PID"; do
  for ((i = 0; i < 300; i++)); do
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.1
  done
  stop_pid "$pid"
done
reloads_ok=$(reloads ok)
reload_errors=$(reloads error)
if ((proxy_died == 0)); then
  sleep "$SETTLE"
  sample $(($(date +%s) - T0)) || proxy_died=1
  # What the descriptors at rest are, for a report.
  ls -l "/proc/$PROXY_PID/fd" >"$WORK/fds-at-rest.txt" 2>&1 || true
  ss -tanp 2>/dev/null | grep "pid=$PROXY_PID," >"$WORK/sockets-at-rest.txt" || true
fi

python3 "$WORK/soak.py" analyze --samples "$OUT/samples.csv" --wrk "$WORK/wrk.json" \
  --ws "$WORK/ws.json" --browser "$WORK/browser.json" --baseline "$WORK/baseline.json" \
  --out "$OUT/summary.json" --commit "$COMMIT" --label "$arg" --duration "$DURATION" \
  --fd-margin "$FD_MARGIN" --reload-ticks "$gen" --reloads-ok "${reloads_ok:-0}" \
  --reload-errors "${reload_errors:-0}" --sighups "$sighups" --proxy-died "$proxy_died" &&
  status=0 || status=$?
echo "soak: details in target/soak/summary.json; logs in target/soak/work/"
exit "$status"
