#!/usr/bin/env python3
"""Summarises a `perf record --call-graph dwarf` profile of portcullis by request-path stage.

usage: profile_summary.py PERF_DATA   (compare.sh runs it with PROFILE=1)

Prints: the share of samples in the kernel and in user space; how user-space time splits
over the stages of the request path (inclusive: a sample counts for every stage on its
stack); the hottest user-space functions (self time); which callers the allocator's time
comes from; and, when the profiled route has limits, the limit phase's frames (the phase,
crates/proxy/src/{limits,plans}.rs, the portcullis_limits crate, the usage record's drop):
their inclusive share by function and the leaf functions under them. Uses
`perf script --no-inline`, so inlined functions count for their caller.
"""

import collections
import subprocess
import sys

ALLOC = {
    "malloc", "_int_malloc", "cfree@GLIBC_2.2.5", "_int_free", "malloc_consolidate",
    "unlink_chunk.constprop.0", "__posix_memalign", "_int_memalign", "_mid_memalign.constprop.0",
    "realloc", "_int_realloc", "__libc_free", "__GI___libc_free", "__GI___libc_malloc",
    "_int_free_merge_chunk", "_int_free_create_chunk", "_int_free_maybe_consolidate",
    "__rustc::__rdl_alloc", "__rustc::__rdl_dealloc", "__rustc::__rdl_realloc",
    "__rust_alloc", "__rust_dealloc", "__rust_realloc",
}
STAGES = [
    ("forward::handle (route, headers, pick, send, respond)", "portcullis_proxy::forward::handle"),
    ("  forward::respond (response headers, metrics)", "portcullis_proxy::forward::respond"),
    ("  forward::strip_hop_by_hop", "portcullis_proxy::forward::strip_hop_by_hop"),
    ("  hyper client send (dispatch channel to the upstream task)", "hyper::client::dispatch::Sender"),
    ("  tokio::time::timeout (per-try timeout)", "tokio::time::timeout::Timeout"),
    ("body::Tracked / forward::Done (pool put-back, log record)", "portcullis_proxy::body::Tracked"),
    ("hyper server: parse request head", "<hyper::proto::h1::role::Server as hyper::proto::h1::Http1Transaction>::parse"),
    ("hyper server: encode response head", "<hyper::proto::h1::role::Server as hyper::proto::h1::Http1Transaction>::encode"),
    ("hyper client: parse response head", "<hyper::proto::h1::role::Client as hyper::proto::h1::Http1Transaction>::parse"),
    ("hyper client: encode request head", "<hyper::proto::h1::role::Client as hyper::proto::h1::Http1Transaction>::encode"),
    ("listen::IdleIo (idle-timeout wrapper)", "IdleIo"),
    ("tokio timers (sleep, timeout, wheel)", "tokio::runtime::time"),
    ("tokio park / epoll", "park_internal"),
    ("phase::check", "portcullis_proxy::phase::check"),
    ("phase::route", "portcullis_proxy::phase::route"),
    ("phase::identify", "portcullis_proxy::phase::identify"),
    ("phase::authorize", "portcullis_proxy::phase::authorize"),
    ("phase::limit", "portcullis_proxy::phase::limit"),
    ("phase::forward", "portcullis_proxy::phase::forward"),
]
# Frames that belong to the limit phase, wherever they are called from (the usage record is
# dropped at the end of the response, the RateLimit headers are written with the response).
LIMIT = (
    "portcullis_proxy::phase::limit",
    "portcullis_proxy::limits::",
    "<portcullis_proxy::limits::",
    "portcullis_proxy::plans::",
    "<portcullis_proxy::plans::",
    "portcullis_limits::",
    "<portcullis_limits::",
    "portcullis_store::",
)


def is_limit(f):
    return f.startswith(LIMIT) or any(p in f for p in (" portcullis_limits::", "portcullis_proxy::phase::limit"))


def load(path):
    text = subprocess.run(["perf", "script", "-i", path, "--no-inline", "-F", "ip,sym"],
                          capture_output=True, text=True, check=True).stdout
    samples, cur = [], []
    for line in text.splitlines():
        if not line.strip():
            if cur:
                samples.append(cur)
                cur = []
            continue
        parts = line.strip().split(None, 1)
        cur.append((parts[0].startswith("ffffffff8"), parts[1] if len(parts) > 1 else "?"))
    if cur:
        samples.append(cur)
    return samples


def main():
    samples = load(sys.argv[1])
    n = len(samples)
    if not n:
        print("no samples")
        return 1
    user = [s for s in samples if not s[0][0]]
    u = len(user)
    print(f"{n} samples: kernel {100 * (n - u) / n:.1f}%, user space {100 * u / n:.1f}%\n")
    print("user-space time by stage (inclusive, % of user-space samples):")
    for name, pat in STAGES:
        k = sum(1 for s in user if any(pat in f for _, f in s))
        print(f"  {100 * k / u:5.1f}%  {name}")
    k = sum(1 for s in user if s[0][1] in ALLOC or s[0][1].startswith("mi_") or s[0][1].startswith("_mi_"))
    print(f"  {100 * k / u:5.1f}%  allocator (self time in malloc/free)")
    k = sum(1 for s in user if "memmove" in s[0][1] or "memcpy" in s[0][1])
    print(f"  {100 * k / u:5.1f}%  memmove/memcpy (self time)")

    print("\nhottest user-space functions (self, % of user space):")
    c = collections.Counter(s[0][1] for s in user)
    for f, k in c.most_common(25):
        print(f"  {100 * k / u:5.2f}%  {f[:150]}")

    print("\nallocator time by caller (% of user space):")
    c = collections.Counter()
    for s in user:
        if s[0][1] not in ALLOC:
            continue
        i = 0
        while i < len(s) and (s[i][1] in ALLOC or s[i][1].startswith(("alloc::", "<alloc::", "core::ptr::drop_in_place")) or "RawVec" in s[i][1]):
            i += 1
        c[" <- ".join(f for _, f in s[i:i + 2]) if i < len(s) else "?"] += 1
    for f, k in c.most_common(12):
        print(f"  {100 * k / u:5.2f}%  {f[:220]}")

    lim = [s for s in user if any(is_limit(f) for _, f in s)]
    if lim:
        print(f"\nlimit phase: {len(lim)} samples with a limit frame on the stack: "
              f"{100 * len(lim) / u:.1f}% of user space, {100 * len(lim) / n:.1f}% of all samples")
        print("  by function (inclusive: a sample counts once for each limit function on its stack; % of user space):")
        c = collections.Counter()
        for s in lim:
            for f in {f for _, f in s if is_limit(f)}:
                c[f] += 1
        for f, k in c.most_common(30):
            print(f"  {100 * k / u:5.2f}%  {f[:200]}")
        print("  leaf functions of those samples (self time under a limit frame; % of user space):")
        c = collections.Counter(s[0][1] for s in lim)
        for f, k in c.most_common(20):
            print(f"  {100 * k / u:5.2f}%  {f[:200]}")
        print("  innermost limit frame of those samples, and the leaf under it (% of user space):")
        c = collections.Counter()
        for s in lim:
            inner = next(f for _, f in s if is_limit(f))
            c[f"{inner[:110]}  [leaf {s[0][1][:70]}]" if s[0][1] != inner else inner[:190]] += 1
        for f, k in c.most_common(25):
            print(f"  {100 * k / u:5.2f}%  {f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
