#!/usr/bin/env python3
"""The driver of bench/failover.sh (run it through that script, which builds portcullis and
starts it and origin B).

It starts origin A (bench/failover_origin.py), polls the proxy's route every POLL_MS over one
keep-alive connection, and KILLS times: waits for the route to answer from A, waits a random
part of the health-check interval (so the kills fall at every phase of the check's timer),
kills A with SIGKILL, waits for the first answer from B, keeps polling for HOLD seconds,
restarts A on its port and waits for the route to come back. Afterwards it reads the events
file sink (server.down, backend.unhealthy, automation.action) and the audit trail
(switch_route records) and reports, per kill and as median and maximum:

  kill → switch visible     the first answer from B after the kill, from the kill
  verdict → switch visible  the same, from the `server.down` event's time (the health
                            check's verdict)
  kill → verdict            the health check's detection time
  verdict → switch applied  the `automation.action` (switch_route, applied) event's time, and
                            the control path's audit record of the switch, from the verdict
  failed requests           after the switch (while the route is on B), during the failback,
                            and before the switch (the route still on the dead origin:
                            expected)

Environment: PROXY_URL, ORIGIN_A_PORT, EVENTS (the JSON-lines sink), AUDIT_DIR, OUT, KILLS [20],
POLL_MS [5], INTERVAL_MS [200] (the health check's, for the random phase), HOLD [0.5],
SEED [1], COMMIT, COMMAND.
"""
import calendar
import http.client
import json
import os
import queue
import random
import re
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.parse

HERE = os.path.dirname(os.path.abspath(__file__))
PROXY_URL = os.environ["PROXY_URL"]
ORIGIN_A_PORT = int(os.environ["ORIGIN_A_PORT"])
EVENTS = os.environ["EVENTS"]
AUDIT_DIR = os.environ["AUDIT_DIR"]
OUT = os.environ["OUT"]
KILLS = int(os.environ.get("KILLS", "20"))
POLL = float(os.environ.get("POLL_MS", "5")) / 1000
INTERVAL = float(os.environ.get("INTERVAL_MS", "200")) / 1000
HOLD = float(os.environ.get("HOLD", "0.5"))
SEED = int(os.environ.get("SEED", "1"))


def rfc3339(s):
    """Unix seconds (float) of an RFC 3339 UTC time with any number of fractional digits."""
    m = re.fullmatch(r"(\d{4})-(\d\d)-(\d\d)T(\d\d):(\d\d):(\d\d)(?:\.(\d+))?(Z|[+-]\d\d:\d\d)", s)
    if not m:
        raise ValueError(f"not RFC 3339: {s}")
    y, mo, d, h, mi, se, frac, tz = m.groups()
    t = calendar.timegm((int(y), int(mo), int(d), int(h), int(mi), int(se)))
    if frac:
        t += int(frac) / 10 ** len(frac)
    if tz != "Z":
        sign = 1 if tz[0] == "+" else -1
        t -= sign * (int(tz[1:3]) * 3600 + int(tz[4:6]) * 60)
    return t


# -------------------------------------------------------------------------------------------
# Origin A
# -------------------------------------------------------------------------------------------

def listening(port):
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return True
    except OSError:
        return False


def start_a():
    p = subprocess.Popen(
        [sys.executable, os.path.join(HERE, "failover_origin.py"), "A", str(ORIGIN_A_PORT)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 10
    while not listening(ORIGIN_A_PORT):
        if p.poll() is not None or time.time() > deadline:
            raise SystemExit(f"origin A did not listen on {ORIGIN_A_PORT}")
        time.sleep(0.005)
    return p


# -------------------------------------------------------------------------------------------
# The poller: one GET every POLL seconds, over a keep-alive connection
# -------------------------------------------------------------------------------------------

class Poller:
    """Starts one GET every POLL seconds, whatever the requests before it are doing: a ticker
    hands the ticks to WORKERS threads, each with its own keep-alive connection. So a request
    that fails slowly (retries against the dead origin) does not delay the next sample."""

    def __init__(self, workers=32):
        u = urllib.parse.urlsplit(PROXY_URL)
        self.host, self.port, self.path = u.hostname, u.port, u.path or "/"
        self.samples = []  # (t_send, t_recv, "A" | "B" | "ERR <why>")
        self.lock = threading.Lock()
        self.ticks = queue.Queue()
        self.stopped = False
        self.threads = [threading.Thread(target=self.ticker, daemon=True)]
        self.threads += [threading.Thread(target=self.worker, daemon=True) for _ in range(workers)]

    def start(self):
        for t in self.threads:
            t.start()

    def stop(self):
        self.stopped = True
        for t in self.threads:
            t.join(timeout=5)

    def ticker(self):
        next_tick = time.time()
        while not self.stopped:
            self.ticks.put(next_tick)
            next_tick += POLL
            rest = next_tick - time.time()
            if rest > 0:
                time.sleep(rest)
            else:
                next_tick = time.time()
        for _ in self.threads:
            self.ticks.put(None)

    def worker(self):
        conn = None
        while True:
            tick = self.ticks.get()
            if tick is None or self.stopped:
                return
            t0 = time.time()
            try:
                if conn is None:
                    conn = http.client.HTTPConnection(self.host, self.port, timeout=2)
                conn.request("GET", self.path)
                r = conn.getresponse()
                body = r.read().decode(errors="replace")
                outcome = body if r.status == 200 and body in ("A", "B") else f"ERR {r.status} {body[:60]!r}"
            except Exception as e:  # noqa: BLE001 - every failure is a sample
                outcome = f"ERR {type(e).__name__}: {e}"
                try:
                    conn.close()
                except Exception:  # noqa: BLE001
                    pass
                conn = None
            t1 = time.time()
            with self.lock:
                self.samples.append((t0, t1, outcome))

    def since(self, t):
        """The samples sent at or after `t`, in the order they were sent."""
        with self.lock:
            return sorted(s for s in self.samples if s[0] >= t)

    def wait(self, t, pred, timeout, what):
        """A sample sent at or after `t` that `pred` accepts."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            for s in self.since(t):
                if pred(s):
                    return s
            time.sleep(0.002)
        raise TimeoutError(f"{what} within {timeout}s")


# -------------------------------------------------------------------------------------------
# The run
# -------------------------------------------------------------------------------------------

def main():
    rng = random.Random(SEED)
    poller = Poller()
    a = start_a()
    poller.start()
    kills = []
    try:
        for i in range(KILLS):
            # The route is on A, and has been for 10 answers in a row.
            t = time.time()
            deadline = t + 20
            while True:
                s = poller.since(t)
                if len(s) >= 10 and all(x[2] == "A" for x in s[-10:]):
                    break
                if time.time() > deadline:
                    raise SystemExit(f"kill {i + 1}: the route did not settle on A: {s[-5:]}")
                time.sleep(0.01)
            time.sleep(rng.uniform(0, INTERVAL))
            t_kill = time.time()
            a.send_signal(signal.SIGKILL)
            a.wait()
            first_b = poller.wait(t_kill, lambda x: x[2] == "B", 10, f"kill {i + 1}: no answer from B")
            time.sleep(HOLD)
            # The earliest answer from B, and the earliest request that got one, now that the
            # requests sent before them have ended.
            on_b = [x for x in poller.since(t_kill) if x[2] == "B"]
            first_b = (min(x[0] for x in on_b), min(x[1] for x in on_b))
            t_restart = time.time()
            a = start_a()
            back = poller.wait(t_restart, lambda x: x[2] == "A", 15, f"kill {i + 1}: the route did not come back")
            time.sleep(0.1)
            kills.append({"t_kill": t_kill, "first_b_send": first_b[0], "first_b": first_b[1],
                          "t_restart": t_restart, "back": back[1]})
            print(f"kill {i + 1:2}: B after {1000 * (first_b[1] - t_kill):6.1f} ms; "
                  f"back on A {1000 * (back[1] - t_restart):6.1f} ms after the restart", flush=True)
    finally:
        poller.stop()
        a.kill()
        a.wait()
    samples = poller.samples
    time.sleep(0.5)  # The file sink writes in batches.
    report(kills, samples)


def load_events():
    out = []
    with open(EVENTS) as f:
        for line in f:
            if line.strip():
                e = json.loads(line)
                e["_t"] = rfc3339(e["time"])
                out.append(e)
    return out


def load_audit():
    out = []
    if not os.path.isdir(AUDIT_DIR):
        return out
    for name in sorted(os.listdir(AUDIT_DIR)):
        with open(os.path.join(AUDIT_DIR, name), errors="replace") as f:
            for line in f:
                try:
                    r = json.loads(line)
                except ValueError:
                    continue
                if isinstance(r, dict) and r.get("detail", {}).get("action") == "switch_route":
                    r["_t"] = rfc3339(r["time"])
                    out.append(r)
    return out


def stats(xs):
    xs = [x for x in xs if x is not None]
    if not xs:
        return {"n": 0}
    return {"n": len(xs), "median_ms": round(1000 * statistics.median(xs), 1),
            "max_ms": round(1000 * max(xs), 1), "min_ms": round(1000 * min(xs), 1)}


def report(kills, samples):
    events = load_events()
    audit = load_audit()
    ok_switches = 0
    for k in kills:
        lo, hi = k["t_kill"] - 0.001, k["t_restart"]
        within = [e for e in events if lo <= e["_t"] < hi]
        down = next((e for e in within if e["type"] == "dev.portcullis.server.down"), None)
        unhealthy = next((e for e in within if e["type"] == "dev.portcullis.backend.unhealthy"), None)
        action = next((e for e in within if e["type"] == "dev.portcullis.automation.action"
                       and e.get("data", {}).get("action") == "switch_route"), None)
        rec = next((r for r in audit if lo <= r["_t"] < hi), None)
        k["down"] = down and down["_t"]
        k["unhealthy"] = unhealthy and unhealthy["_t"]
        k["action"] = action and action["_t"]
        k["action_result"] = action and action["data"].get("result")
        k["action_caused_by_unhealthy"] = bool(action and unhealthy and action.get("causedby") == unhealthy["id"])
        k["audit"] = rec and rec["_t"]
        ok_switches += k["action_result"] == "applied"
        sent = lambda a, b: [s for s in samples if a <= s[0] < b]  # noqa: E731
        k["failed_before_switch"] = sum(s[2].startswith("ERR") for s in sent(k["t_kill"], k["first_b_send"]))
        after = sent(k["first_b_send"], k["t_restart"])
        k["requests_after_switch"] = len(after)
        k["failed_after_switch"] = [s for s in after if s[2] != "B"]
        fb = sent(k["t_restart"], k["back"] + 0.1)
        k["failed_in_failback"] = [s for s in fb if s[2].startswith("ERR")]
        k["kill_to_visible"] = k["first_b"] - k["t_kill"]
        k["verdict_to_visible"] = down and k["first_b"] - down["_t"]
        k["kill_to_verdict"] = down and down["_t"] - k["t_kill"]
        k["verdict_to_action"] = down and action and action["_t"] - down["_t"]
        k["verdict_to_audit"] = down and rec and rec["_t"] - down["_t"]
        k["restart_to_back"] = k["back"] - k["t_restart"]

    rows = [
        ("kill → switch visible (first answer from B)", "kill_to_visible"),
        ("verdict (`server.down` time) → switch visible", "verdict_to_visible"),
        ("kill → verdict (health check detection)", "kill_to_verdict"),
        ("verdict → switch applied (`automation.action` time)", "verdict_to_action"),
        ("verdict → switch audited (control-path record, ms precision)", "verdict_to_audit"),
        ("origin A restarted → route back on A", "restart_to_back"),
    ]
    summary = {key: stats([k[key] for k in kills]) for _, key in rows}
    failed_after = sum(len(k["failed_after_switch"]) for k in kills)
    requests_after = sum(k["requests_after_switch"] for k in kills)
    failed_failback = sum(len(k["failed_in_failback"]) for k in kills)
    before = [k["failed_before_switch"] for k in kills]
    ok_durations = sorted(s[1] - s[0] for s in samples if not s[2].startswith("ERR"))
    poll = {"requests": len(samples),
            "answered_median_ms": round(1000 * statistics.median(ok_durations), 2) if ok_durations else None,
            "answered_p99_ms": round(1000 * ok_durations[int(0.99 * (len(ok_durations) - 1))], 2) if ok_durations else None}
    over_1s = sum(1 for k in kills if k["verdict_to_visible"] is None or k["verdict_to_visible"] > 1.0)
    result = {
        "commit": os.environ.get("COMMIT", ""),
        "command": os.environ.get("COMMAND", ""),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "kills": len(kills), "poll_ms": POLL * 1000, "interval_ms": INTERVAL * 1000,
        "summary": summary,
        "poll": poll,
        "switches_applied": ok_switches,
        "switches_caused_by_backend_unhealthy": sum(k["action_caused_by_unhealthy"] for k in kills),
        "requests_after_switch": requests_after,
        "failed_after_switch": failed_after,
        "failed_in_failback": failed_failback,
        "failed_before_switch": {"median": statistics.median(before) if before else None,
                                 "max": max(before) if before else None, "total": sum(before)},
        "verdict_to_visible_over_1s": over_1s,
        "per_kill": kills,
    }
    with open(os.path.join(OUT, "failover.json"), "w") as f:
        json.dump(result, f, indent=1, default=str)

    lines = [
        f"{len(kills)} kills, polled every {POLL * 1000:g} ms ({poll['requests']} requests; an answered "
        f"one took {poll['answered_median_ms']} ms median, {poll['answered_p99_ms']} ms p99); "
        f"{result['date']}, {result['commit']}",
        "",
        "| measure | median | max | min |",
        "|---|---:|---:|---:|",
    ]
    for label, key in rows:
        s = summary[key]
        if s["n"]:
            lines.append(f"| {label} | {s['median_ms']:.1f} ms | {s['max_ms']:.1f} ms | {s['min_ms']:.1f} ms |")
        else:
            lines.append(f"| {label} | – | – | – |")
    lines += [
        "",
        f"- switches applied by the trigger: {ok_switches} of {len(kills)} "
        f"({result['switches_caused_by_backend_unhealthy']} with `causedby` = the `backend.unhealthy` event)",
        f"- verdict → switch visible over 1 s: {over_1s} of {len(kills)}",
        f"- failed requests after the switch: {failed_after} of {requests_after}; "
        f"during the failback: {failed_failback}",
        f"- failed requests between the kill and the switch (route still on the dead origin): "
        f"median {result['failed_before_switch']['median']}, max {result['failed_before_switch']['max']} per kill",
    ]
    for k in kills:
        for s in k["failed_after_switch"] + k["failed_in_failback"]:
            lines.append(f"  - failed at +{1000 * (s[0] - k['t_kill']):.1f} ms after kill: {s[2]}")
    text = "\n".join(lines) + "\n"
    with open(os.path.join(OUT, "failover.md"), "w") as f:
        f.write(text)
    print()
    print(text)
    if failed_after or over_1s or ok_switches != len(kills):
        sys.exit(1)


if __name__ == "__main__":
    main()
