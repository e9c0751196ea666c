#!/usr/bin/env python3
"""Compares two `perf record` profiles of portcullis per request: where a route with a feature
(limits, audit, ...) spends more CPU than the same build's route without it.

usage: profile_diff.py A.perf.data A_REQUESTS B.perf.data B_REQUESTS [--freq HZ] [--top N]

Each profile is turned into CPU microseconds per request: samples × (1e6 / HZ) / requests,
with HZ the sampling frequency given to `perf record -F` (compare.sh's PERF_FREQ, default 499)
and REQUESTS what wrk completed while perf recorded (the `requests in` line of
bench/out/raw/profile-<variant>.txt). Prints the totals (kernel, user space), then the
functions whose self time per request differs most (A − B), then, inclusive, the
portcullis functions of the request path that differ most. Uses `perf script --no-inline`, so
inlined functions count for their caller: a difference in a caller's self time is work
inlined into it.

compare.sh with PROFILE=1 PROFILE_VARIANT="portcullis-jwt-limits portcullis-jwt" records both.
"""

import argparse
import collections
import sys

sys.path.insert(0, __import__("os").path.dirname(__file__))
from profile_summary import load  # noqa: E402


def per_request(path, requests, hz):
    samples = load(path)
    us = 1e6 / hz / requests
    kernel = sum(1 for s in samples if s[0][0])
    user = [s for s in samples if not s[0][0]]
    self_ = collections.Counter(s[0][1] for s in user)
    incl = collections.Counter()
    for s in user:
        for f in {f for _, f in s}:
            incl[f] += 1
    return {
        "total": len(samples) * us, "kernel": kernel * us, "user": len(user) * us,
        "self": {f: k * us for f, k in self_.items()},
        "incl": {f: k * us for f, k in incl.items()},
        "samples": len(samples),
    }


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("a")
    ap.add_argument("a_requests", type=int)
    ap.add_argument("b")
    ap.add_argument("b_requests", type=int)
    ap.add_argument("--freq", type=float, default=499)
    ap.add_argument("--top", type=int, default=25)
    args = ap.parse_args()
    a = per_request(args.a, args.a_requests, args.freq)
    b = per_request(args.b, args.b_requests, args.freq)
    print(f"A {args.a}: {a['samples']} samples, {args.a_requests:,} requests; "
          f"B {args.b}: {b['samples']} samples, {args.b_requests:,} requests; {args.freq:g} Hz\n")
    print("CPU per request (µs):      A        B    A − B")
    for k in ("total", "user", "kernel"):
        print(f"  {k:<20} {a[k]:8.2f} {b[k]:8.2f} {a[k] - b[k]:+8.2f}")

    def diff(kind, keep=lambda f: True):
        fs = {f for f in a[kind] if keep(f)} | {f for f in b[kind] if keep(f)}
        rows = [(a[kind].get(f, 0) - b[kind].get(f, 0), a[kind].get(f, 0), b[kind].get(f, 0), f) for f in fs]
        rows.sort(key=lambda r: -abs(r[0]))
        for d, x, y, f in rows[:args.top]:
            print(f"  {d:+7.3f}  {x:7.3f}  {y:7.3f}  {f[:150]}")

    print("\nself time per request, largest differences (µs: A − B, A, B):")
    diff("self")
    print("\ninclusive time per request of portcullis functions, largest differences (µs: A − B, A, B):")
    diff("incl", lambda f: "portcullis" in f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
