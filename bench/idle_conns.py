#!/usr/bin/env python3
"""Memory under idle keep-alive connections, for bench/compare.sh.

Opens N TCP connections to a proxy on loopback, sends one keep-alive GET on each and reads
its response (so every connection has carried a request, as a browser's would), then holds
them all open, idle, while the proxy's resident memory (VmRSS from /proc/PID/status) is
sampled. Prints one JSON object:

  {"pid": .., "conns": N, "ok": responses, "rss_before_kib": .., "rss_idle_kib": ..,
   "rss_after_close_kib": .., "kib_per_conn": ..}

rss_before is taken after one warm-up request, rss_idle is the highest of several samples
taken while all N connections are open, and rss_after_close is taken after closing them.
The requests go out in batches (default 200 at a time) so the proxy's upstream pool stays
small and the numbers measure client-connection state, not upstream connections.
"""

import argparse
import json
import resource
import selectors
import socket
import sys
import time


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


def read_response(sock: socket.socket, deadline: float) -> bool:
    """Reads one HTTP/1.1 response with a Content-Length body. True when it was a 200."""
    buf = b""
    while b"\r\n\r\n" not in buf:
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        chunk = sock.recv(65536)
        if not chunk:
            return False
        buf += chunk
    head, _, body = buf.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    status_ok = lines[0].split(b" ")[1:2] == [b"200"]
    length = 0
    for l in lines[1:]:
        k, _, v = l.partition(b":")
        if k.strip().lower() == b"content-length":
            length = int(v.strip())
    while len(body) < length:
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        chunk = sock.recv(65536)
        if not chunk:
            return False
        body += chunk
    return status_ok


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--pid", type=int, required=True, help="process whose VmRSS is sampled")
    ap.add_argument("--conns", type=int, default=10000)
    ap.add_argument("--batch", type=int, default=200)
    ap.add_argument("--hold", type=float, default=3.0, help="seconds to hold the connections open")
    ap.add_argument("--settle", type=float, default=1.0, help="seconds to wait before and after")
    args = ap.parse_args()
    if args.host not in ("127.0.0.1", "localhost", "::1"):
        print("loopback only", file=sys.stderr)
        return 2

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = args.conns + 64
    if soft < need:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(need, hard), hard))
        if min(need, hard) < need:
            print(f"open-file limit {hard} is below {need}", file=sys.stderr)
            return 2

    req = f"GET /idle HTTP/1.1\r\nHost: {args.host}:{args.port}\r\nConnection: keep-alive\r\n\r\n".encode()

    # One warm-up request, so lazy initialisation does not count as per-connection memory.
    w = socket.create_connection((args.host, args.port), timeout=5)
    w.sendall(req)
    read_response(w, time.monotonic() + 5)
    w.close()
    time.sleep(args.settle)
    before = rss_kib(args.pid)

    socks = []
    ok = 0
    failed = 0
    t0 = time.monotonic()
    for start in range(0, args.conns, args.batch):
        batch = []
        for _ in range(min(args.batch, args.conns - start)):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            s.settimeout(10)
            try:
                s.connect((args.host, args.port))
                s.sendall(req)
            except OSError:
                failed += 1
                s.close()
                continue
            batch.append(s)
        deadline = time.monotonic() + 30
        for s in batch:
            try:
                if read_response(s, deadline):
                    ok += 1
                else:
                    failed += 1
            except OSError:
                failed += 1
            socks.append(s)
    opened = time.monotonic() - t0

    time.sleep(args.settle)
    samples = []
    end = time.monotonic() + args.hold
    while True:
        samples.append(rss_kib(args.pid))
        if time.monotonic() >= end:
            break
        time.sleep(0.25)
    idle = max(samples)

    # Check the connections are still open (the proxy did not close idle ones early).
    sel = selectors.DefaultSelector()
    for s in socks:
        s.setblocking(False)
        sel.register(s, selectors.EVENT_READ)
    closed_early = len(sel.select(timeout=0))
    sel.close()

    for s in socks:
        s.close()
    time.sleep(args.settle + 1.0)
    after = rss_kib(args.pid)

    out = {
        "pid": args.pid,
        "conns": args.conns,
        "ok": ok,
        "failed": failed,
        "closed_early": closed_early,
        "open_seconds": round(opened, 2),
        "rss_before_kib": before,
        "rss_idle_kib": idle,
        "rss_after_close_kib": after,
        "kib_per_conn": round((idle - before) / max(1, ok), 2),
    }
    print(json.dumps(out))
    return 0 if failed == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
