#!/usr/bin/env python3
"""Turns the raw output of bench/compare.sh into bench/out/results.json and a markdown table.

usage: analyze.py OUT_DIR   (run by compare.sh; metadata comes from its environment)

Reads OUT_DIR/raw/<variant>-rN.txt for each variant that ran (haproxy, portcullis, and with
SCENARIO=jwt|all haproxy-jwt, portcullis-jwt, portcullis-jwt-audit, portcullis-jwt-limits,
portcullis-jwt-plan, haproxy-jwt-limits, portcullis-jwt-redis; with SCENARIO=events portcullis-events and
portcullis-jwt-events) (wrk --latency output, plus `cpu_ticks` and
`loadavg` lines that compare.sh appends) and OUT_DIR/raw/mem-*.json (bench/idle_conns.py),
writes OUT_DIR/results.json and prints the markdown to paste into BENCHMARKS.md.
"""

import datetime
import glob
import json
import os
import re
import statistics
import sys

PROXIES = ("haproxy", "portcullis")
VARIANTS = ("haproxy", "portcullis", "haproxy-jwt", "portcullis-jwt", "portcullis-jwt-audit",
            "portcullis-jwt-limits", "portcullis-jwt-plan", "haproxy-jwt-limits", "portcullis-jwt-redis",
            "portcullis-base", "portcullis-jwt-base", "haproxy-log", "portcullis-log",
            "portcullis-events", "portcullis-jwt-events", "portcullis-jwt-redis-batch")
LABELS = {"haproxy": "HAProxy plain", "portcullis": "portcullis plain",
          "haproxy-jwt": "HAProxy jwt_verify", "portcullis-jwt": "portcullis JWT + policy",
          "portcullis-jwt-audit": "portcullis JWT + policy + audit",
          "portcullis-jwt-limits": "portcullis JWT + policy + limits",
          "portcullis-jwt-plan": "portcullis JWT + policy + usage plan",
          "haproxy-jwt-limits": "HAProxy jwt_verify + stick table",
          "portcullis-jwt-redis": "portcullis JWT + policy + limits in Redis",
          "portcullis-jwt-redis-batch": "portcullis JWT + policy + limits in Redis, batched",
          "portcullis-base": "portcullis plain, base build",
          "portcullis-jwt-base": "portcullis JWT + policy, base build",
          "haproxy-log": "HAProxy httplog", "portcullis-log": "portcullis access log",
          "portcullis-events": "portcullis plain, events on",
          "portcullis-jwt-events": "portcullis JWT + policy, events on"}
# The settings users run (access log on; JWT + policy + audit): (numerator, denominator,
# target, is the target a floor of the ratio (True) or a ceiling of the cost 1 - ratio (False), what)
REAL_TARGETS = {
    "log_vs_haproxy_log": ("portcullis-log", "haproxy-log", 1.1, True, "portcullis access log / HAProxy httplog"),
    "log_cost": ("portcullis-log", "portcullis", 0.08, False, "cost of portcullis's access log (1 − with / without)"),
    "haproxy_log_cost": ("haproxy-log", "haproxy", None, False, "cost of HAProxy's httplog (1 − with / without)"),
    "audit_vs_plain": ("portcullis-jwt-audit", "portcullis", 0.90, True, "portcullis JWT + policy + audit / portcullis plain"),
}
BASE_TARGET = 0.98  # portcullis plain / the base build (BASE_BIN), req/s
# Events and a trigger on, against the same route of the same build with events off
# (SCENARIO=events): (numerator, denominator, target ratio, what)
EVENTS_TARGETS = {
    "events_plain": ("portcullis-events", "portcullis", 0.98, "plain route, events on / off"),
    "events_jwt": ("portcullis-jwt-events", "portcullis-jwt", 0.98, "JWT + policy route, events on / off"),
}
JWT_TARGETS = {  # (numerator, denominator, target ratio, what)
    "jwt_vs_haproxy_jwt": ("portcullis-jwt", "haproxy-jwt", 5.0, "portcullis JWT + policy / HAProxy jwt_verify"),
    "jwt_vs_plain": ("portcullis-jwt", "portcullis", 0.95, "portcullis JWT + policy / portcullis plain"),
    "audit_vs_plain": ("portcullis-jwt-audit", "portcullis", 0.95, "portcullis JWT + policy + audit / portcullis plain"),
    "audit_vs_haproxy_jwt": ("portcullis-jwt-audit", "haproxy-jwt", 5.0, "portcullis JWT + policy + audit / HAProxy jwt_verify"),
    "limits_vs_jwt": ("portcullis-jwt-limits", "portcullis-jwt", 0.97, "portcullis JWT + policy + limits / JWT + policy"),
    "plan_vs_jwt": ("portcullis-jwt-plan", "portcullis-jwt", 0.97, "portcullis JWT + policy + usage plan / JWT + policy"),
    "redis_vs_jwt": ("portcullis-jwt-redis", "portcullis-jwt", 0.85, "portcullis JWT + policy + limits in Redis / JWT + policy"),
    "redis_batch_vs_jwt": ("portcullis-jwt-redis-batch", "portcullis-jwt", 0.85, "portcullis JWT + policy + limits in Redis, batched / JWT + policy"),
}
# Ratios without a target, reported beside those above: HAProxy's cost of a stick table on its
# JWT frontend, set against portcullis's cost of its limits (each relative to its own JWT route).
LIMIT_COMPARISONS = {
    "haproxy_limits_vs_jwt": ("haproxy-jwt-limits", "haproxy-jwt", "HAProxy jwt_verify + stick table / HAProxy jwt_verify"),
    "limits_vs_haproxy_limits": ("portcullis-jwt-limits", "haproxy-jwt-limits", "portcullis JWT + policy + limits / HAProxy jwt_verify + stick table"),
    "redis_vs_limits": ("portcullis-jwt-redis", "portcullis-jwt-limits", "portcullis limits in Redis / limits in the process"),
}
UNITS = {"us": 1e-3, "ms": 1.0, "s": 1000.0, "m": 60000.0}


def ms(text: str) -> float:
    m = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text)
    if not m:
        raise ValueError(f"bad wrk duration {text!r}")
    return float(m.group(1)) * UNITS[m.group(2)]


def parse_wrk(path: str, clk_tck: int) -> dict:
    text = open(path).read()
    r = {"file": os.path.basename(path)}
    m = re.search(r"Requests/sec:\s+([\d.]+)", text)
    if not m:
        raise ValueError(f"{path}: no Requests/sec line")
    r["rps"] = float(m.group(1))
    for pct in ("50", "75", "90", "99"):
        m = re.search(rf"^\s+{pct}%\s+(\S+)", text, re.M)
        r[f"p{pct}_ms"] = ms(m.group(1)) if m else None
    m = re.search(r"(\d+) requests in ([\d.]+\w+)", text)
    r["requests"] = int(m.group(1)) if m else None
    m = re.search(r"Non-2xx or 3xx responses: (\d+)", text)
    r["non_2xx"] = int(m.group(1)) if m else 0
    m = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text)
    r["socket_errors"] = sum(map(int, m.groups())) if m else 0
    m = re.search(r"^cpu_ticks (\d+)(?: user (\d+) sys (\d+))?", text, re.M)
    tick_us = 1e6 / clk_tck
    r["cpu_us_per_req"] = r["user_us_per_req"] = r["sys_us_per_req"] = None
    if m and r["requests"]:
        r["cpu_us_per_req"] = int(m.group(1)) * tick_us / r["requests"]
        if m.group(2) is not None:
            r["user_us_per_req"] = int(m.group(2)) * tick_us / r["requests"]
            r["sys_us_per_req"] = int(m.group(3)) * tick_us / r["requests"]
    m = re.search(r"^loadavg ([\d.]+)", text, re.M)
    r["loadavg"] = float(m.group(1)) if m else None
    return r


def median(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def machine() -> dict:
    cpu = "unknown"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem_kib = 0
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                mem_kib = int(line.split()[1])
    return {"nproc": os.cpu_count(), "cpu": cpu, "mem_gib": round(mem_kib / 1024 / 1024, 1),
            "kernel": os.uname().release}


def fmt(x, nd=0, unit=""):
    if x is None:
        return "n/a"
    return f"{x:,.{nd}f}{unit}"


def main() -> int:
    out = sys.argv[1]
    env = os.environ
    clk_tck = os.sysconf("SC_CLK_TCK")
    rounds = {}
    for p in VARIANTS:
        # (exactly <variant>-rN.txt: portcullis-jwt-r* would also match portcullis-jwt-redis-r1.txt)
        files = [f for f in glob.glob(f"{out}/raw/{p}-r*.txt")
                 if re.fullmatch(re.escape(p) + r"-r\d+\.txt", os.path.basename(f))]
        files.sort(key=lambda f: int(re.search(r"-r(\d+)\.txt$", f).group(1)))
        if files:
            rounds[p] = [parse_wrk(f, clk_tck) for f in files]
    if not rounds:
        print("no wrk results found", file=sys.stderr)
        return 1

    summary = {}
    for p in rounds:
        rs = rounds[p]
        summary[p] = {
            "rps_median": median([r["rps"] for r in rs]),
            "rps_min": min(r["rps"] for r in rs),
            "rps_max": max(r["rps"] for r in rs),
            "p50_ms_median": median([r["p50_ms"] for r in rs]),
            "p90_ms_median": median([r["p90_ms"] for r in rs]),
            "p99_ms_median": median([r["p99_ms"] for r in rs]),
            "cpu_us_per_req_median": median([r["cpu_us_per_req"] for r in rs]),
            "user_us_per_req_median": median([r["user_us_per_req"] for r in rs]),
            "sys_us_per_req_median": median([r["sys_us_per_req"] for r in rs]),
            "errors": sum(r["non_2xx"] + r["socket_errors"] for r in rs),
        }
        memf = f"{out}/raw/mem-{p}.json"
        if os.path.exists(memf) and os.path.getsize(memf) > 0:
            summary[p]["memory"] = json.loads(open(memf).read())

    ratio = lambda a, b: (a / b) if a is not None and b else None
    plain = "haproxy" in summary and "portcullis" in summary
    h, c = summary.get("haproxy", {}), summary.get("portcullis", {})
    ratios = {} if not plain else {
        "rps": ratio(c["rps_median"], h["rps_median"]),
        "p50": ratio(c["p50_ms_median"], h["p50_ms_median"]),
        "p99": ratio(c["p99_ms_median"], h["p99_ms_median"]),
        "cpu_per_req": ratio(c["cpu_us_per_req_median"], h["cpu_us_per_req_median"]),
    }
    targets = {} if not plain else {
        "rps_min_ratio": 0.9, "rps_goal_ratio": 1.0, "p99_max_ratio": 1.2,
        "rps_met": ratios["rps"] is not None and ratios["rps"] >= 0.9,
        "p99_met": ratios["p99"] is not None and ratios["p99"] <= 1.2,
    }
    meta = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine(),
        "versions": {
            "haproxy": env.get("HAPROXY_VERSION", ""),
            "nginx": env.get("NGINX_VERSION", ""),
            "wrk": env.get("WRK_VERSION", ""),
            "portcullis_commit": env.get("COMMIT", ""),
        },
        "settings": {k.lower(): env.get(k) for k in
                     ("ROUNDS", "DURATION", "WARMUP", "THREADS", "CONNS", "IDLE_CONNS", "PIN",
                      "PROXY_CPU", "LOAD_CPU", "PARITY", "QUICK", "NOFILE")},
        "loadavg_start": env.get("LOAD_START"),
        "loadavg_end": env.get("LOAD_END"),
    }
    jwt = None
    if all(v in summary for v in ("portcullis", "haproxy-jwt", "portcullis-jwt", "portcullis-jwt-audit")):
        jwt = {"rps_ratios": {}, "cpu_ratios": {}, "targets": {}}
        for k, (a, b, t, _) in JWT_TARGETS.items():
            if a not in summary or b not in summary:
                continue
            r = ratio(summary[a]["rps_median"], summary[b]["rps_median"])
            jwt["rps_ratios"][k] = r
            jwt["cpu_ratios"][k] = ratio(summary[a]["cpu_us_per_req_median"], summary[b]["cpu_us_per_req_median"])
            jwt["targets"][k] = {"target": t, "met": r is not None and r >= t}
        for k, (a, b, _) in {**{k: (a, b, w) for k, (a, b, _, w) in JWT_TARGETS.items()}, **LIMIT_COMPARISONS}.items():
            if a in rounds and b in rounds:
                jwt.setdefault("per_round_rps_ratios", {})[k] = [ratio(x["rps"], y["rps"]) for x, y in zip(rounds[a], rounds[b])]
        for k, (a, b, _) in LIMIT_COMPARISONS.items():
            if a in summary and b in summary:
                jwt["rps_ratios"][k] = ratio(summary[a]["rps_median"], summary[b]["rps_median"])
                jwt["cpu_ratios"][k] = ratio(summary[a]["cpu_us_per_req_median"], summary[b]["cpu_us_per_req_median"])
        if env.get("STORE_ERRORS") is not None and "portcullis-jwt-redis" in summary:
            jwt["redis"] = {"store_errors": int(env["STORE_ERRORS"]), "limit_checks": int(env.get("LIMIT_CHECKS") or 0),
                            "redis_commands": int(env.get("REDIS_COMMANDS") or 0), "redis_keys": env.get("REDIS_KEYS"),
                            "redis_evalsha": int(env.get("REDIS_EVALSHA") or 0),
                            "redis_evalsha_us": float(env["REDIS_EVALSHA_US"]) if env.get("REDIS_EVALSHA_US") else None}
        if env.get("BATCH_STORE_ERRORS") is not None and "portcullis-jwt-redis-batch" in summary:
            jwt["redis_batch"] = {"store_errors": int(env["BATCH_STORE_ERRORS"]),
                                  "limit_checks": int(env.get("BATCH_LIMIT_CHECKS") or 0),
                                  "redis_evalsha": int(env.get("BATCH_EVALSHA") or 0),
                                  "redis_evalsha_us": float(env["BATCH_EVALSHA_US"]) if env.get("BATCH_EVALSHA_US") else None}
        jwt["audit_cost"] = {
            "rps_ratio": ratio(summary["portcullis-jwt-audit"]["rps_median"], summary["portcullis-jwt"]["rps_median"]),
            "cpu_us_per_req_delta": (summary["portcullis-jwt-audit"]["cpu_us_per_req_median"] or 0)
                                    - (summary["portcullis-jwt"]["cpu_us_per_req_median"] or 0),
        }
        if "haproxy" in summary:
            jwt["haproxy_jwt_vs_plain"] = ratio(summary["haproxy-jwt"]["rps_median"], summary["haproxy"]["rps_median"])
        if env.get("AUDIT_RECORDS"):
            jwt["audit_records"] = int(env["AUDIT_RECORDS"])
            jwt["audit_requests_completed"] = int(env.get("AUDIT_REQS") or 0)
            jwt["audit_bytes"] = int(env.get("AUDIT_BYTES") or 0)
    meta["scenario"] = env.get("SCENARIO", "plain")
    results = {"meta": meta, "summary": summary, "ratios": ratios, "targets": targets, "jwt": jwt, "rounds": rounds}
    with open(f"{out}/results.json", "w") as f:
        json.dump(results, f, indent=2)

    # Markdown
    s = meta["settings"]
    hv = re.sub(r"^HAProxy version (\S+).*", r"\1", meta["versions"]["haproxy"])
    lines = []
    lines.append(f"Run {meta['date']}: {meta['machine']['nproc']} × {meta['machine']['cpu']}, "
                 f"{meta['machine']['mem_gib']} GiB; portcullis {meta['versions']['portcullis_commit']}, "
                 f"HAProxy {hv}; SCENARIO={meta['scenario']}; {s['rounds']} rounds × `wrk -t{s['threads']} -c{s['conns']} -d{s['duration']} --latency`, "
                 f"pinned={'yes' if s['pin'] == '1' else 'no'}, HAProxy parity headers={'on' if s['parity'] == '1' else 'off'}; "
                 f"load average {meta['loadavg_start']} → {meta['loadavg_end']}.")
    lines.append("")
    ok = lambda met: "✅" if met else "❌"
    if plain:
        plain_table(lines, h, c, hv, ratios, targets, ratio, rounds, fmt, ok)
    if jwt:
        jwt_table(lines, summary, jwt, rounds, ratio, ok)
    if "portcullis-log" in summary and "haproxy-log" in summary:
        real_table(lines, summary, rounds, ratio, ok, env)
    if any(EVENTS_TARGETS[k][0] in summary for k in EVENTS_TARGETS):
        events_table(lines, summary, rounds, ratio, ok)
    for this, base in (("portcullis", "portcullis-base"), ("portcullis-jwt", "portcullis-jwt-base")):
        if this in summary and base in summary:
            base_table(lines, summary, rounds, ratio, ok, env.get("BASE_COMMIT", ""), this, base)
    print("\n".join(lines))
    return 0


def real_table(lines, summary, rounds, ratio, ok, env):
    """The rows of the settings users run: both access logs on, and the audited JWT route,
    from the same rounds as the plain routes."""
    lines.append("")
    lines.append(f"At the settings users run (same rounds; access logs to stdout, redirected to a file; "
                 f"portcullis format `{env.get('ACCESS_LOG_FORMAT', 'json')}`):")
    lines.append("")
    lines.append("| ratio | req/s, median of the medians | per round | CPU per request | target |")
    lines.append("|---|---:|---|---:|---|")
    for k, (a, b, t, floor, what) in REAL_TARGETS.items():
        if a not in summary or b not in summary:
            continue
        r = ratio(summary[a]["rps_median"], summary[b]["rps_median"])
        per = [ratio(x["rps"], y["rps"]) for x, y in zip(rounds[a], rounds[b])]
        cpu = ratio(summary[a]["cpu_us_per_req_median"], summary[b]["cpu_us_per_req_median"])
        if floor:
            shown, met, tgt = fmt(r, 3, "×"), r is not None and r >= t, f"≥ {t:g}×"
            per_s = ", ".join(fmt(x, 3) for x in per)
        else:
            cost = None if r is None else 1 - r
            shown, met, tgt = (f"{cost * 100:.1f} %" if cost is not None else "n/a"), cost is not None and t is not None and cost <= t, (f"≤ {t * 100:g} %" if t else "")
            per_s = ", ".join(f"{(1 - x) * 100:.1f} %" for x in per if x is not None)
        lines.append(f"| {what} | **{shown}** | {per_s} | {fmt(cpu, 2, '×')} "
                     f"({summary[a]['cpu_us_per_req_median'] - summary[b]['cpu_us_per_req_median']:+.2f} µs) | "
                     f"{tgt} {ok(met) if tgt else ''} |")
    if env.get("LOG_LINES_HAPROXY"):
        lines.append("")
        lines.append(f"Access log lines written during the run: HAProxy {int(env['LOG_LINES_HAPROXY']):,}, "
                     f"portcullis {int(env.get('LOG_LINES_PORTCULLIS') or 0):,}.")


def events_table(lines, summary, rounds, ratio, ok):
    """What events and a trigger cost each route, from the same rounds."""
    lines.append("")
    lines.append("Events on (a durable webhook sink, a JSON-lines file sink and one trigger), same rounds:")
    lines.append("")
    lines.append("| ratio | req/s, median of the medians | median of per-round ratios | per round | CPU per request | target |")
    lines.append("|---|---:|---:|---|---:|---|")
    for a, b, t, what in EVENTS_TARGETS.values():
        if a not in summary or b not in summary:
            continue
        r = ratio(summary[a]["rps_median"], summary[b]["rps_median"])
        per = [ratio(x["rps"], y["rps"]) for x, y in zip(rounds[a], rounds[b])]
        cpu = ratio(summary[a]["cpu_us_per_req_median"], summary[b]["cpu_us_per_req_median"])
        lines.append(f"| {what} | **{fmt(r, 3, '×')}** | {fmt(median(per), 3, '×')} | "
                     f"{', '.join(fmt(x, 3) for x in per)} | {fmt(cpu, 3, '×')} "
                     f"({summary[a]['cpu_us_per_req_median'] - summary[b]['cpu_us_per_req_median']:+.2f} µs) | "
                     f"≥ {t:g}× {ok(r is not None and r >= t)} |")


def base_table(lines, summary, rounds, ratio, ok, base_commit, this, base):
    """A route of this build against the same route of another build (BASE_BIN), from the
    same rounds."""
    n, b = summary[this], summary[base]
    r = ratio(n["rps_median"], b["rps_median"])
    per_round = [ratio(x["rps"], y["rps"]) for x, y in zip(rounds[this], rounds[base])]
    lines.append("")
    what = "plain route" if this == "portcullis" else "JWT + policy route"
    lines.append(f"This build against the base build ({base_commit}), {what}, same rounds:")
    lines.append("")
    lines.append("| metric | base build | this build | this / base | target |")
    lines.append("|---|---:|---:|---:|---|")
    lines.append(f"| req/s, median (min–max) | {fmt(b['rps_median'])} ({fmt(b['rps_min'])}–{fmt(b['rps_max'])}) | "
                 f"{fmt(n['rps_median'])} ({fmt(n['rps_min'])}–{fmt(n['rps_max'])}) | **{fmt(r, 3, '×')}** | "
                 f"≥ {BASE_TARGET}× {ok(r is not None and r >= BASE_TARGET)} |")
    lines.append(f"| p99 latency, median | {fmt(b['p99_ms_median'], 3, ' ms')} | {fmt(n['p99_ms_median'], 3, ' ms')} | "
                 f"{fmt(ratio(n['p99_ms_median'], b['p99_ms_median']), 2, '×')} | |")
    lines.append(f"| proxy CPU per request, median | {fmt(b['cpu_us_per_req_median'], 2, ' µs')} | {fmt(n['cpu_us_per_req_median'], 2, ' µs')} | "
                 f"{fmt(ratio(n['cpu_us_per_req_median'], b['cpu_us_per_req_median']), 3, '×')} | |")
    lines.append(f"| this / base req/s, per round | | | {', '.join(fmt(x, 3) for x in per_round)} (median {fmt(median(per_round), 3)}) | |")


def jwt_table(lines, summary, jwt, rounds, ratio, ok):
    cols = [v for v in ("haproxy-jwt", "haproxy-jwt-limits", "portcullis", "portcullis-jwt", "portcullis-jwt-audit",
                        "portcullis-jwt-limits", "portcullis-jwt-plan", "portcullis-jwt-redis", "portcullis-jwt-redis-batch")
            if v in summary]
    if lines:
        lines.append("")
    lines.append("JWT, policy and audit (same rounds; every JWT variant sends the same ES256 bearer token):")
    lines.append("")
    lines.append("| metric | " + " | ".join(LABELS[v] for v in cols) + " |")
    lines.append("|---|" + "---:|" * len(cols))
    S = [summary[v] for v in cols]
    lines.append("| req/s, median (min–max) | " + " | ".join(
        f"{fmt(x['rps_median'])} ({fmt(x['rps_min'])}–{fmt(x['rps_max'])})" for x in S) + " |")
    for pct in ("50", "90", "99"):
        lines.append(f"| p{pct} latency, median | " + " | ".join(fmt(x[f'p{pct}_ms_median'], 3, ' ms') for x in S) + " |")
    lines.append("| proxy CPU per request, median | " + " | ".join(fmt(x["cpu_us_per_req_median"], 1, " µs") for x in S) + " |")
    lines.append("| … of which user space | " + " | ".join(fmt(x["user_us_per_req_median"], 1, " µs") for x in S) + " |")
    lines.append("| … of which kernel | " + " | ".join(fmt(x["sys_us_per_req_median"], 1, " µs") for x in S) + " |")
    lines.append("| errors (non-2xx + socket) | " + " | ".join(str(x["errors"]) for x in S) + " |")
    lines.append("")
    lines.append("| ratio | req/s | CPU per request | target (req/s) |")
    lines.append("|---|---:|---:|---|")
    for k, (a, b, t, what) in JWT_TARGETS.items():
        if k not in jwt["rps_ratios"]:
            continue
        lines.append(f"| {what} | **{fmt(jwt['rps_ratios'][k], 2, '×')}** | {fmt(jwt['cpu_ratios'][k], 2, '×')} | "
                     f"≥ {t:g}× {ok(jwt['targets'][k]['met'])} |")
    for k, (a, b, what) in LIMIT_COMPARISONS.items():
        if k in jwt["rps_ratios"]:
            lines.append(f"| {what} | **{fmt(jwt['rps_ratios'][k], 2, '×')}** | {fmt(jwt['cpu_ratios'][k], 2, '×')} "
                         f"({summary[a]['cpu_us_per_req_median'] - summary[b]['cpu_us_per_req_median']:+.1f} µs) | |")
    ac = jwt["audit_cost"]
    lines.append(f"| portcullis JWT + policy + audit / JWT + policy (the audit record's cost) | {fmt(ac['rps_ratio'], 2, '×')} | "
                 f"{fmt(ratio(summary['portcullis-jwt-audit']['cpu_us_per_req_median'], summary['portcullis-jwt']['cpu_us_per_req_median']), 2, '×')} "
                 f"({ac['cpu_us_per_req_delta']:+.1f} µs) | |")
    if jwt.get("haproxy_jwt_vs_plain") is not None:
        lines.append(f"| HAProxy jwt_verify / HAProxy plain | {fmt(jwt['haproxy_jwt_vs_plain'], 2, '×')} | "
                     f"{fmt(ratio(summary['haproxy-jwt']['cpu_us_per_req_median'], summary['haproxy']['cpu_us_per_req_median']), 2, '×')} | |")
    prr = jwt.get("per_round_rps_ratios", {})
    shown = [k for k in ("limits_vs_jwt", "plan_vs_jwt", "redis_vs_jwt", "redis_batch_vs_jwt", "haproxy_limits_vs_jwt",
                         "limits_vs_haproxy_limits") if k in prr]
    if shown:
        lines.append("")
        lines.append("Per-round req/s ratios of the limit variants (each from the same round; the median of these "
                     "is less sensitive to a disturbed round than the ratio of medians):")
        lines.append("")
        whats = {**{k: w for k, (_, _, _, w) in JWT_TARGETS.items()}, **{k: w for k, (_, _, w) in LIMIT_COMPARISONS.items()}}
        for k in shown:
            lines.append(f"- {whats[k]}: {', '.join(fmt(x, 3) for x in prr[k])} (median **{fmt(median(prr[k]), 3)}**)")
    if "redis" in jwt:
        rd = jwt["redis"]
        lines.append("")
        lines.append(f"Redis variant: `portcullis_limit_store_errors_total` {rd['store_errors']} after the rounds "
                     f"({'no check fell back to local counters' if rd['store_errors'] == 0 else 'some checks fell back to local counters'}); "
                     f"`portcullis_limit_checks_total` {rd['limit_checks']:,}; Redis ran {rd['redis_evalsha']:,} `EVALSHA` "
                     f"(one per check, {fmt(rd['redis_evalsha_us'], 1, ' µs')} each inside Redis; "
                     f"{rd['redis_commands']:,} commands in all, counting those the script runs); Redis keys at the end: {rd['redis_keys']}.")
    if "redis_batch" in jwt:
        rb = jwt["redis_batch"]
        lines.append("")
        lines.append(f"Batched Redis variant: `portcullis_limit_store_errors_total` {rb['store_errors']}; "
                     f"`portcullis_limit_checks_total` {rb['limit_checks']:,}; its Redis ran {rb['redis_evalsha']:,} `EVALSHA` "
                     f"({fmt(rb['redis_evalsha_us'], 1, ' µs')} each inside Redis): "
                     f"one per {fmt(rb['limit_checks'] / rb['redis_evalsha'] if rb['redis_evalsha'] else None, 0)} checks.")
    if "audit_records" in jwt:
        lines.append("")
        lines.append(f"Audit trail: {jwt['audit_records']:,} records written during the rounds for "
                     f"{jwt['audit_requests_completed']:,} requests wrk saw completed "
                     f"({jwt['audit_bytes'] / 1048576:,.1f} MiB on disk, including the warm-up's records).")
    lines.append("")
    lines.append("Per round, req/s (CPU µs/req), 1-min load average after the round:")
    lines.append("")
    vs = [v for v in VARIANTS if v in rounds]
    lines.append("| round | " + " | ".join(LABELS[v] for v in vs) + " | load |")
    lines.append("|---:|" + "---:|" * (len(vs) + 1))
    for i in range(min(len(rounds[v]) for v in vs)):
        cells = [f"{fmt(rounds[v][i]['rps'])} ({fmt(rounds[v][i]['cpu_us_per_req'], 1)})" for v in vs]
        lines.append(f"| {i + 1} | " + " | ".join(cells) + f" | {fmt(rounds[vs[-1]][i]['loadavg'], 2)} |")


def plain_table(lines, h, c, hv, ratios, targets, ratio, rounds, fmt, ok):
    lines.append(f"| metric | HAProxy {hv} | portcullis | portcullis / HAProxy | target |")
    lines.append("|---|---:|---:|---:|---|")
    lines.append(f"| req/s, median (min–max) | {fmt(h['rps_median'])} ({fmt(h['rps_min'])}–{fmt(h['rps_max'])}) | "
                 f"{fmt(c['rps_median'])} ({fmt(c['rps_min'])}–{fmt(c['rps_max'])}) | **{fmt(ratios['rps'], 2, '×')}** | "
                 f"≥ 0.90× (goal ≥ 1.0×) {ok(targets['rps_met'])} |")
    lines.append(f"| p50 latency, median | {fmt(h['p50_ms_median'], 3, ' ms')} | {fmt(c['p50_ms_median'], 3, ' ms')} | {fmt(ratios['p50'], 2, '×')} | |")
    lines.append(f"| p90 latency, median | {fmt(h['p90_ms_median'], 3, ' ms')} | {fmt(c['p90_ms_median'], 3, ' ms')} | "
                 f"{fmt(ratio(c['p90_ms_median'], h['p90_ms_median']), 2, '×')} | |")
    lines.append(f"| p99 latency, median | {fmt(h['p99_ms_median'], 3, ' ms')} | {fmt(c['p99_ms_median'], 3, ' ms')} | "
                 f"**{fmt(ratios['p99'], 2, '×')}** | ≤ 1.20× {ok(targets['p99_met'])} |")
    lines.append(f"| proxy CPU per request, median | {fmt(h['cpu_us_per_req_median'], 1, ' µs')} | {fmt(c['cpu_us_per_req_median'], 1, ' µs')} | "
                 f"{fmt(ratios['cpu_per_req'], 2, '×')} | |")
    for kind in ("user", "sys"):
        k = f"{kind}_us_per_req_median"
        if h.get(k) is not None and c.get(k) is not None:
            lines.append(f"| … of which {'user space' if kind == 'user' else 'kernel'} | {fmt(h[k], 1, ' µs')} | {fmt(c[k], 1, ' µs')} | "
                         f"{fmt(ratio(c[k], h[k]), 2, '×')} | |")
    lines.append(f"| errors (non-2xx + socket) | {h['errors']} | {c['errors']} | | 0 |")
    hm, cm = h.get("memory"), c.get("memory")
    if hm and cm:
        n = hm["conns"]
        mib = lambda k: k / 1024
        lines.append(f"| RSS before (MiB) | {fmt(mib(hm['rss_before_kib']), 1)} | {fmt(mib(cm['rss_before_kib']), 1)} | "
                     f"{fmt(ratio(cm['rss_before_kib'], hm['rss_before_kib']), 2, '×')} | |")
        lines.append(f"| RSS with {n:,} idle keep-alive conns (MiB) | {fmt(mib(hm['rss_idle_kib']), 1)} | {fmt(mib(cm['rss_idle_kib']), 1)} | "
                     f"{fmt(ratio(cm['rss_idle_kib'], hm['rss_idle_kib']), 2, '×')} | |")
        lines.append(f"| memory per idle conn (KiB) | {fmt(hm['kib_per_conn'], 1)} | {fmt(cm['kib_per_conn'], 1)} | "
                     f"{fmt(ratio(cm['kib_per_conn'], hm['kib_per_conn']), 2, '×')} | |")
        lines.append(f"| RSS after closing them (MiB) | {fmt(mib(hm['rss_after_close_kib']), 1)} | {fmt(mib(cm['rss_after_close_kib']), 1)} | | |")
        bad = [(p, m) for p, m in (("haproxy", hm), ("portcullis", cm)) if m["failed"] or m["closed_early"]]
        for p, m in bad:
            lines.append(f"\n⚠ {p}: {m['failed']} idle-connection requests failed, {m['closed_early']} connections closed early.")
    lines.append("")
    lines.append("Per round (req/s, p99 ms, CPU µs/req, 1-min load average after the run):")
    lines.append("")
    lines.append("| round | HAProxy req/s | HAProxy p99 | HAProxy CPU | portcullis req/s | portcullis p99 | portcullis CPU | load |")
    lines.append("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for i, (a, b) in enumerate(zip(rounds["haproxy"], rounds["portcullis"]), 1):
        lines.append(f"| {i} | {fmt(a['rps'])} | {fmt(a['p99_ms'], 3)} | {fmt(a['cpu_us_per_req'], 1)} | "
                     f"{fmt(b['rps'])} | {fmt(b['p99_ms'], 3)} | {fmt(b['cpu_us_per_req'], 1)} | {fmt(b['loadavg'], 2)} |")


if __name__ == "__main__":
    sys.exit(main())
