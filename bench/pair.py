#!/usr/bin/env python3
"""Two portcullis processes under load at the same time, sharing one core: the paired form
of bench/ab.sh, for differences of a few percent on a noisy machine.

Both processes run on core 0 and each gets a wrk client (on core 1, with nginx) at the same
moment, so the scheduler splits core 0 between them and each one's req/s is what its CPU per
request allows within its share. Whatever slows the machine during a round (another tenant,
a frequency change) slows both alike and cancels in their ratio, where bench/ab.sh, which
loads one process after the other, sees it as a difference between them. Each round prints
both processes' requests and their user and system CPU per request (from /proc, in
microseconds); the summary gives the medians of the per-round ratios A/B.

System CPU per request is the kernel's share (sockets, the same for two routes that answer
alike), so a feature's own cost shows in the user column; the total column is what
throughput follows.

    OUT=/abs/bench/out-x bench/pair.py CONF_A CONF_B [ROUNDS] [DURATION]
    e.g. OUT=$PWD/bench/out bench/pair.py portcullis-jwt-plan portcullis-jwt 10 3s

OUT must hold a compare.sh run with SCENARIO=jwt (nginx.conf, jwt/token.txt, the rendered
configs). PORTCULLIS_BIN (default target/release/portcullis) runs both configs; BIN_B, if
set, runs CONF_B (two builds on one route). Two processes differ by a percent or two even
on one build and config (check with CONF_A = CONF_B); run both orders and take the geometric
mean. The system clock ticks 100 times a second, so a round of 3 s counts CPU to about 3 %;
take ten rounds or more. Everything stays on 127.0.0.1.
"""
import math
import os
import re
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.environ.get("OUT") or sys.exit("OUT=<absolute path of a compare.sh run with SCENARIO=jwt>")
if len(sys.argv) < 3:
    sys.exit(__doc__)
CONFS = sys.argv[1:3]
ROUNDS = int(sys.argv[3]) if len(sys.argv) > 3 else 10
DURATION = sys.argv[4] if len(sys.argv) > 4 else "3s"
BINS = [os.environ.get("PORTCULLIS_BIN", f"{ROOT}/target/release/portcullis")]
BINS.append(os.environ.get("BIN_B", BINS[0]))
PORTS = [24692, 24693]
HZ = os.sysconf("SC_CLK_TCK")


def render(i, conf):
    """The config on its own port, with its own state directory."""
    y = open(f"{OUT}/{conf}.yaml").read()
    y = re.sub(r'^    bind: "127\.0\.0\.1:\d+"', f'    bind: "127.0.0.1:{PORTS[i]}"', y, count=1, flags=re.M)
    y = re.sub(r'^state_dir: "(.*)"', rf'state_dir: "\1-pair{i}"', y, flags=re.M)
    path = f"{OUT}/pair-{i}.yaml"
    open(path, "w").write(y)
    m = re.search(r'^state_dir: "(.*)"', y, flags=re.M)
    if m:
        subprocess.run(["rm", "-rf", m.group(1)], check=True)
    return path


def cpu(p):
    f = open(f"/proc/{p.pid}/stat").read().rsplit(")", 1)[1].split()
    return int(f[11]), int(f[12])  # utime, stime


def main():
    token = open(f"{OUT}/jwt/token.txt").read().strip()
    procs = []
    nginx = subprocess.Popen(["taskset", "-c", "1", "nginx", "-c", f"{OUT}/nginx.conf", "-p", f"{OUT}/",
                              "-e", f"{OUT}/nginx-error.log"])
    try:
        env = {**os.environ, "PORTCULLIS_LOG": "warn"}
        for i, conf in enumerate(CONFS):
            procs.append(subprocess.Popen(["taskset", "-c", "0", BINS[i], "run", "--config", render(i, conf)],
                                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env))
        time.sleep(2)
        rows = []
        for r in range(ROUNDS + 1):  # round 0 warms up
            before = [cpu(p) for p in procs]
            wrk = [subprocess.Popen(["taskset", "-c", "1", "wrk", "-t1", "-c64", f"-d{DURATION}",
                                     "-H", f"Authorization: Bearer {token}", f"http://127.0.0.1:{port}/"],
                                    stdout=subprocess.PIPE, text=True) for port in PORTS]
            outs = [w.communicate()[0] for w in wrk]
            after = [cpu(p) for p in procs]
            if r == 0:
                continue
            row = []
            for i in range(2):
                n = int(re.search(r"(\d+) requests in", outs[i]).group(1))
                us = [(after[i][k] - before[i][k]) * 1e6 / HZ / n for k in (0, 1)]
                row.append((n, us[0], us[1]))
            rows.append(row)
            print(f"round {r}: " + "  ".join(
                f"{CONFS[i]} {row[i][0]} req, user {row[i][1]:.2f} us, sys {row[i][2]:.2f} us" for i in range(2)),
                flush=True)
        med = lambda f: statistics.median(f(a, b) for a, b in rows)
        print("%s / %s, medians of per-round ratios: req/s %.3f  user CPU/req %.3f  sys CPU/req %.3f  "
              "total CPU/req %.3f" % (CONFS[0], CONFS[1], med(lambda a, b: a[0] / b[0]), med(lambda a, b: a[1] / b[1]),
                                      med(lambda a, b: a[2] / b[2]),
                                      med(lambda a, b: (a[1] + a[2]) / (b[1] + b[2]))))
        gm = math.exp(statistics.mean(math.log(a[0] / b[0]) for a, b in rows))
        print("geometric mean of per-round req/s ratios: %.3f" % gm)
    finally:
        for p in procs:
            p.kill()
        # SIGTERM: nginx's master stops its workers (killed, they would keep the port).
        nginx.terminate()
        nginx.wait()


if __name__ == "__main__":
    main()
