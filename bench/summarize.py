#!/usr/bin/env python3
"""Turns the JSON of bench/compare.sh into docs/BENCHMARKS.md (printed on stdout).

Medians over runs; ratios of ssehub to each peer are computed from the same set of runs.
Everything in the current docs/BENCHMARKS.md after the NOTES marker is kept as it is.
"""
import glob
import json
import os
import platform
import re
import statistics
import subprocess
import sys

NOTES = "<!-- notes: everything below is kept by bench/summarize.py -->"
PEERS = ["ssehub", "baseline", "nchan"]
PEER_NAMES = {"ssehub": "ssehub", "baseline": "naive axum + broadcast", "nchan": "nginx + nchan"}

results_dir = sys.argv[1] if len(sys.argv) > 1 else "bench/results"
runs = {}  # (label, peer) -> [report]
for path in sorted(glob.glob(os.path.join(results_dir, "*.json"))):
    m = re.match(r"(.+)-(ssehub|baseline|nchan)-(\d+)\.json$", os.path.basename(path))
    if not m:
        continue
    with open(path) as f:
        runs.setdefault((m.group(1), m.group(2)), []).append(json.load(f))

peers = [p for p in PEERS if any(k[1] == p for k in runs)]


def med(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def get(report, path):
    v = report
    for k in path.split("."):
        if v is None:
            return None
        v = v.get(k)
    return v


def fmt(v, digits=0):
    if v is None:
        return "—"
    if digits == 0:
        return f"{v:,.0f}"
    return f"{v:,.{digits}f}"


METRICS = [
    ("delivered", "delivered", 0),
    ("expected", "expected", 0),
    ("lost", "lost", 0),
    ("duplicates", "duplicates", 0),
    ("disconnected (readers)", "disconnected", 0),
    ("publish rate achieved /s", "rate_achieved", 0),
    ("latency p50 ms", "latency_ms.p50", 2),
    ("latency p99 ms", "latency_ms.p99", 2),
    ("latency max ms", "latency_ms.max", 1),
    ("server CPU s", "server.cpu_secs", 2),
    ("**deliveries per server CPU-second**", "server.deliveries_per_cpu_sec", 0),
    ("server RSS connected MiB", "server.rss_connected_kib", None),
    ("server RSS peak MiB", "server.rss_peak_kib", None),
    ("server RSS per subscriber KiB", "server.rss_per_subscriber_kib", 2),
    ("bench CPU s", "bench_cpu_secs", 2),
]


def cell(label, peer, path, digits):
    reports = runs.get((label, peer), [])
    vals = [get(r, path) for r in reports]
    if digits is None:  # KiB shown as MiB
        vals = [v / 1024 if v is not None else None for v in vals]
        digits = 1
    m = med(vals)
    if m is None:
        return "—"
    each = ", ".join(fmt(v, digits) for v in vals)
    return f"{fmt(m, digits)} <sub>({each})</sub>" if len(vals) > 1 else fmt(m, digits)


def ratio(label, peer, path, higher_is_better=True):
    a = med([get(r, path) for r in runs.get((label, "ssehub"), [])])
    b = med([get(r, path) for r in runs.get((label, peer), [])])
    if not a or not b:
        return "—"
    return f"{(a / b if higher_is_better else b / a):.2f}×"


def scenario_table(label):
    out = ["| | " + " | ".join(PEER_NAMES[p] for p in peers) + " |",
           "|---|" + "---|" * len(peers)]
    for name, path, digits in METRICS:
        out.append(f"| {name} | " + " | ".join(cell(label, p, path, digits) for p in peers) + " |")
    others = [p for p in peers if p != "ssehub"]
    if "ssehub" in peers and others:
        out.append("")
        out.append("| ssehub vs | " + " | ".join(PEER_NAMES[p] for p in others) + " |")
        out.append("|---|" + "---|" * len(others))
        out.append("| deliveries per server CPU-second (ssehub ÷ peer) | "
                   + " | ".join(ratio(label, p, "server.deliveries_per_cpu_sec") for p in others) + " |")
        out.append("| p99 latency (peer ÷ ssehub) | "
                   + " | ".join(ratio(label, p, "latency_ms.p99", False) for p in others) + " |")
        out.append("| RSS per subscriber (peer ÷ ssehub) | "
                   + " | ".join(ratio(label, p, "server.rss_per_subscriber_kib", False) for p in others) + " |")
    return "\n".join(out)


def s3_table():
    labels = sorted({k[0] for k in runs if k[0].startswith("S3-")}, key=lambda s: int(s[3:]))
    if not labels:
        return None
    out = ["| offered rate /s | " + " | ".join(
        f"{PEER_NAMES[p]}: achieved /s · lost · p99 ms · deliveries/CPU-s" for p in peers) + " |",
        "|---|" + "---|" * len(peers)]
    for label in labels:
        row = []
        for p in peers:
            rs = runs.get((label, p), [])
            if not rs:
                row.append("not run (a lower rate already failed)")
                continue
            row.append(" · ".join([
                fmt(med([r["rate_achieved"] for r in rs])),
                fmt(med([r["lost"] for r in rs])),
                fmt(med([r["latency_ms"]["p99"] for r in rs]), 2),
                fmt(med([get(r, "server.deliveries_per_cpu_sec") for r in rs])),
            ]))
        out.append(f"| {label[3:]} | " + " | ".join(row) + " |")
    out.append("")
    out.append("| highest achieved publish rate with no loss and p99 < 100 ms (median of runs) | "
               + " | ".join(PEER_NAMES[p] for p in peers) + " |")
    out.append("|---|" + "---|" * len(peers))
    best = []
    for p in peers:
        per_run = {}
        for label in labels:
            for r_i, r in enumerate(runs.get((label, p), [])):
                per_run.setdefault(r_i, 0)
                if r["lost"] == 0 and r["latency_ms"]["p99"] < 100 and r["duplicates"] == 0:
                    per_run[r_i] = max(per_run[r_i], round(r["rate_achieved"]))
        best.append(fmt(med(list(per_run.values()))) if per_run else "—")
    out.append("| | " + " | ".join(best) + " |")
    return "\n".join(out)


def machine():
    cpu = "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    mem = ""
    try:
        with open("/proc/meminfo") as f:
            mem = f"{int(f.readline().split()[1]) / 1048576:.0f} GiB RAM"
    except OSError:
        pass
    rustc = subprocess.run(["rustc", "--version"], capture_output=True, text=True).stdout.strip()
    nginx = subprocess.run(["sh", "-c", "nginx -v 2>&1; dpkg-query -W libnginx-mod-nchan 2>/dev/null"],
                           capture_output=True, text=True).stdout.strip().replace("\n", ", ")
    return (f"{os.cpu_count()} × {cpu}, {mem}, Linux {platform.release()}; {rustc}; "
            f"{nginx or 'nginx not installed'}")


DESCRIPTIONS = {
    "S1": "steady fan-out: 1,000 subscribers, 2,000 updates at 200/s, 100 bytes",
    "S2": "wide fan-out: 10,000 subscribers, 300 updates at 20/s (3 million deliveries)",
    "S4": "slow consumers: 200 subscribers + 5 that never read, 5,000 updates of 4 KiB at 500/s",
    "S4-noslow": "S4 without the 5 slow subscribers (the reference for S4's p99)",
    "S5": "idle connections: 19,000 subscribers, one update; memory per subscriber",
    "S6": "many topics: 10,000 subscribers spread over 1,000 topics, 2,000 updates at 200/s to random topics",
}

print("# Benchmarks")
print()
print("Generated by `bench/compare.sh` (tables) from the JSON in `bench/results/`; the notes at the")
print("end are written by hand. Scenarios and targets: `PERFORMANCE.md` in the shared docs.")
print()
print(f"**Machine:** {machine()}. The load generator (`ssehub bench`) and the server share the")
print("same cores, so absolute figures are noisy; the ratios are between peers measured in the")
print("same script run, each cell is the median of the runs (each run shown in small print).")
print("Server CPU is utime + stime from `/proc/PID/stat` (all nginx processes summed) from the")
print("first publish to the last delivery; memory per subscriber is (RSS connected − RSS idle) /")
print("subscribers.")
print()
print("## Commands")
print()
print("```")
print("bench/compare.sh            # RUNS=2 by default; PEERS, SCENARIOS, S3_RATES may be set")
print("ssehub bench --target ssehub --jwt-key SECRET --pid $(pgrep -x ssehub) \\")
print("    --subscribers 1000 --updates 2000 --rate 200 --size 100")
print("```")
print()
print("Per-scenario flags are in `bench/compare.sh`; every run has a freshly started server.")
print()
for label in ["S1", "S2", "S3", "S4", "S4-noslow", "S5", "S6"]:
    if label == "S3":
        t = s3_table()
        if t:
            print("## S3 — throughput: 100 subscribers, rising publish rate (3 s per step)")
            print()
            print(t)
            print()
        continue
    if not any(k[0] == label for k in runs):
        continue
    print(f"## {label} — {DESCRIPTIONS.get(label, '')}")
    print()
    print(scenario_table(label))
    if label == "S4":
        print()
        print("| slow subscribers closed by the server by the end | "
              + " | ".join(cell(label, p, "slow_dropped", 0) for p in peers) + " |")
        print("|---|" + "---|" * len(peers))
    print()

notes = ""
try:
    with open("docs/BENCHMARKS.md") as f:
        text = f.read()
    if NOTES in text:
        notes = text.split(NOTES, 1)[1]
except OSError:
    pass
print(NOTES, end="")
print(notes if notes else "\n")
