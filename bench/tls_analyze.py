#!/usr/bin/env python3
"""Turns bench/tls.sh's raw output into results.json and a markdown table.

usage: tls_analyze.py OUT_DIR            (the whole run; metadata from the environment)
       tls_analyze.py --one FILE PART    (one round's figure, for tls.sh's progress lines)

Each raw file is one tool's output (h2load, wrk or `openssl s_time`) plus a `cpu_ticks N`
line: the proxy's CPU time (user + system) over the round, in clock ticks.
"""

import glob
import json
import os
import re
import statistics
import sys

CLK_US = 1e6 / os.sysconf("SC_CLK_TCK")
PARTS = {  # part: (what is counted, the variants to set side by side, HAProxy first)
    "h2": ("req/s, h2 over TLS, 16 connections × 100 streams (h2load)", ("haproxy", "portcullis")),
    "h1tls": ("req/s, HTTP/1.1 over TLS, 64 keep-alive connections (wrk)", ("haproxy", "portcullis")),
    "handshakes-new": ("new TLS 1.3 handshakes/s, no resumption (h2load, a connection per request)", ("haproxy", "portcullis")),
    "handshakes-reuse": ("resumed TLS handshakes/s (openssl s_time -reuse)", ("haproxy", "portcullis")),
    "workers": ("req/s, plain HTTP/1.1, wrk -t2 -c64, nothing pinned", ("haproxy-1", "portcullis-1", "haproxy-2", "portcullis-2")),
}
TARGETS = {"h2": 1.0, "handshakes-new": 1.0}


def parse(path: str, part: str, secs: float) -> dict:
    text = open(path).read()
    r = {"file": os.path.basename(path)}
    count = None
    if part == "h2":
        m = re.search(r"finished in [\d.]+m?s, ([\d.]+) req/s", text)
        r["rate"] = float(m.group(1)) if m else None
        m = re.search(r"requests: \d+ total, \d+ started, (\d+) done, (\d+) succeeded, (\d+) failed, (\d+) errored", text)
        if m:
            count = int(m.group(2))
            r["errors"] = int(m.group(3)) + int(m.group(4))
    elif part in ("h1tls", "workers"):
        m = re.search(r"Requests/sec:\s+([\d.]+)", text)
        r["rate"] = float(m.group(1)) if m else None
        m = re.search(r"(\d+) requests in", text)
        count = int(m.group(1)) if m else None
        m = re.search(r"Non-2xx or 3xx responses: (\d+)", text)
        r["errors"] = int(m.group(1)) if m else 0
    elif part == "handshakes-new":  # h2load runs, one connection per request
        done = [int(x) for x in re.findall(r"requests: \d+ total, \d+ started, \d+ done, (\d+) succeeded", text)]
        # h2load writes a run under a second in milliseconds ("finished in 605.81ms")
        took = [float(x) / (1000 if unit == "ms" else 1)
                for x, unit in re.findall(r"finished in ([\d.]+)(ms|s)\b", text)]
        clients = max(1, int(os.environ.get("HANDSHAKE_CLIENTS", "2")))
        count = sum(done) if done else None
        # each client's loop ran its runs back to back: its rate is its count over its time
        r["rate"] = count / (sum(took) / clients) if count and took else None
        r["errors"] = sum(int(x) for x in re.findall(r"succeeded, (\d+) failed", text))
    else:  # openssl s_time -reuse, one block per client
        conns = [int(x) for x in re.findall(r"(\d+) connections in [\d.]+s;", text)]
        count = sum(conns) if conns else None
        r["rate"] = count / secs if count else None
        r["errors"] = len(re.findall(r"ERROR|error", text))
    m = re.search(r"^cpu_ticks (\d+)", text, re.M)
    r["cpu_us_per_op"] = int(m.group(1)) * CLK_US / count if m and count else None
    r["count"] = count
    return r


def med(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def fmt(x, nd=0, unit=""):
    return "n/a" if x is None else f"{x:,.{nd}f}{unit}"


def main() -> int:
    if sys.argv[1] == "--one":
        r = parse(sys.argv[2], sys.argv[3], float(os.environ.get("DURATION", "10s").rstrip("s")))
        print(f"{fmt(r['rate'])}/s, proxy CPU {fmt(r['cpu_us_per_op'], 1)} µs each")
        return 0
    out = sys.argv[1]
    secs = float(os.environ.get("DURATION", "10s").rstrip("s"))
    results = {}
    for part, (_, variants) in PARTS.items():
        for v in variants:
            files = sorted(glob.glob(f"{out}/raw/{part}-{v}-r*.txt"),
                           key=lambda f: int(re.search(r"-r(\d+)\.txt$", f).group(1)))
            if files:
                results.setdefault(part, {})[v] = [parse(f, part, secs) for f in files]
    env = os.environ
    meta = {k.lower(): env.get(k) for k in ("COMMIT", "ROUNDS", "DURATION", "PIN", "HANDSHAKE_CLIENTS",
                                           "HAPROXY_VERSION", "H2LOAD_VERSION", "OPENSSL_VERSION")}
    json.dump({"meta": meta, "results": results}, open(f"{out}/results.json", "w"), indent=2)
    lines = [f"HTTPS run: portcullis {meta['commit']}, {meta['haproxy_version'] or 'HAProxy'}; "
             f"{meta['rounds']} rounds × {meta['duration']}, ABBA order; one ECDSA P-256 certificate; "
             f"{meta['openssl_version']}, {meta['h2load_version']}.", "",
             "| what | HAProxy | portcullis | portcullis / HAProxy | per round | proxy CPU per op (HAProxy, portcullis) | target |",
             "|---|---:|---:|---:|---|---|---|"]
    for part, (what, variants) in PARTS.items():
        res = results.get(part)
        if not res:
            continue
        pairs = [(variants[i], variants[i + 1]) for i in range(0, len(variants), 2)]
        for h, p in pairs:
            if h not in res or p not in res:
                continue
            hr, pr = med([x["rate"] for x in res[h]]), med([x["rate"] for x in res[p]])
            ratio = pr / hr if hr and pr else None
            per = [x["rate"] / y["rate"] for x, y in zip(res[p], res[h]) if x["rate"] and y["rate"]]
            hc, pc = med([x["cpu_us_per_op"] for x in res[h]]), med([x["cpu_us_per_op"] for x in res[p]])
            t = TARGETS.get(part)
            label = what + (f" ({h.split('-')[-1]} thread{'s' if h.endswith('2') else ''})" if part == "workers" else "")
            tgt = "" if t is None else f"≥ {t:g}× {'✅' if ratio is not None and ratio >= t else '❌'}"
            lines.append(f"| {label} | {fmt(hr)} | {fmt(pr)} | **{fmt(ratio, 3, '×')}** | "
                         f"{', '.join(fmt(x, 3) for x in per)} | {fmt(hc, 1, ' µs')}, {fmt(pc, 1, ' µs')} | {tgt} |")
            errs = sum(x.get("errors") or 0 for x in res[h] + res[p])
            if errs:
                lines.append(f"| ⚠ errors in the rows above | | | | {errs} | | |")
    w = results.get("workers")
    if w and all(k in w for k in ("haproxy-1", "haproxy-2", "portcullis-1", "portcullis-2")):
        s = lambda k: med([x["rate"] for x in w[k]])
        lines += ["", f"Scaling from one thread to two (same rounds): HAProxy {fmt(s('haproxy-2') / s('haproxy-1'), 2, '×')}, "
                      f"portcullis {fmt(s('portcullis-2') / s('portcullis-1'), 2, '×')}."]
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
