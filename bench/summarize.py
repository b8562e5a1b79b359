#!/usr/bin/env python3
"""Turns the JSON of bench/compare.sh into docs/BENCHMARKS.md (printed on stdout).

Medians over runs; ratios of ssehub to each peer are computed from the same set of runs.
A soak (`ssehub bench --soak`, saved as bench/results/soak*.json) gets its own section, and its
plot is written beside the document (bench/results/soak.json -> docs/soak.svg).
Everything in the current docs/BENCHMARKS.md after the NOTES marker is kept as it is.
"""
import glob
import json
import math
import os
import platform
import re
import statistics
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import frontier  # noqa: E402  (bench/frontier.py, beside this file)

NOTES = "<!-- notes: everything below is kept by bench/summarize.py -->"
PEERS = ["ssehub", "ssehub_memory", "baseline", "nchan"]
PEER_NAMES = {"ssehub": "ssehub", "ssehub_memory": "ssehub, history in memory only",
              "baseline": "naive axum + broadcast", "nchan": "nginx + nchan"}

results_dir = sys.argv[1] if len(sys.argv) > 1 else "bench/results"
runs = {}  # (label, peer) -> [report], in run order; each report keeps its run number in "_run"
found = []
for path in glob.glob(os.path.join(results_dir, "*.json")):
    m = re.match(r"(.+)-(ssehub_memory|ssehub|baseline|nchan)-(\d+)\.json$", os.path.basename(path))
    if m:
        found.append((m.group(1), m.group(2), int(m.group(3)), path))
for label, peer, run, path in sorted(found, key=lambda x: (x[0], x[1], x[2])):
    with open(path) as f:
        report = json.load(f)
    report["_run"] = run
    runs.setdefault((label, peer), []).append(report)

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
    ("publish answered p99 ms", "publish_answer_ms.p99", 2),
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


# Rows the TLS and HTTP/2 scenarios add: over HTTP/2 a connection carries several subscribers.
CONNECTION_METRICS = [
    ("connections", "connections", 0),
    ("server RSS per connection KiB", "server.rss_per_connection_kib", 2),
]


def scenario_table(label, extra=()):
    out = ["| | " + " | ".join(PEER_NAMES[p] for p in peers) + " |",
           "|---|" + "---|" * len(peers)]
    for name, path, digits in METRICS + list(extra):
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
        f"{PEER_NAMES[p]}: achieved /s · lost · p99 ms · deliveries/CPU-s · publish answered p99 ms"
        for p in peers) + " |",
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
                fmt(med([get(r, "publish_answer_ms.p99") for r in rs]), 2),
            ]))
        out.append(f"| {label[3:]} | " + " | ".join(row) + " |")
    out.append("")
    out.append("| highest achieved publish rate with no loss and p99 < 100 ms (median of runs) | "
               + " | ".join(PEER_NAMES[p] for p in peers) + " |")
    out.append("|---|" + "---|" * len(peers))
    best = []
    for p in peers:
        # Per run (by its number, not its place in a list: a run that stopped early has no
        # file at the higher rates), the highest rate it passed, by the rule compare.sh stops
        # on: no loss or duplicates, p99 < 100 ms, and at least 90 % of the offered rate.
        per_run = {}
        for label in labels:
            for r in runs.get((label, p), []):
                per_run.setdefault(r["_run"], 0)
                if (r["lost"] == 0 and r["latency_ms"]["p99"] < 100 and r["duplicates"] == 0
                        and r["rate_achieved"] >= 0.9 * r["rate_requested"]):
                    per_run[r["_run"]] = max(per_run[r["_run"]], round(r["rate_achieved"]))
        best.append(med(list(per_run.values())) if per_run else None)
    out.append("| | " + " | ".join(fmt(b) if b is not None else "—" for b in best) + " |")
    rate = dict(zip(peers, best))
    if rate.get("ssehub") and rate.get("ssehub_memory"):
        out.append("")
        out.append(f"With the durable history on (ssehub's default), {rate['ssehub'] / rate['ssehub_memory']:.0%} "
                   "of the rate with it in memory only (`--data-dir none`), in the same batch.")
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


def nice_step(span, ticks=5):
    """A round tick step (1, 2 or 5 times a power of ten) giving about `ticks` ticks."""
    raw = max(span, 1e-9) / ticks
    power = 10 ** math.floor(math.log10(raw))
    return next(m * power for m in (1, 2, 5, 10) if m * power >= raw)


def soak_svg(report):
    """Server RSS (MiB) and open fds over time as an SVG: two panels sharing the time axis.

    Written by hand, about as long as the code to drive a charting library, and with no
    dependency to install: the project's only other script needs nothing beyond Python.
    """
    samples = report["samples"]
    minutes = [s["elapsed_secs"] / 60 for s in samples]
    x_end = max(minutes[-1], 1e-9)
    width, left, right, panel, gap, top = 760, 70, 20, 170, 50, 30
    plot_w = width - left - right
    height = top + 2 * panel + gap + 45
    x_step = nice_step(x_end, 8)

    def x_of(m):
        return left + plot_w * m / x_end

    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
           f'viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="12">',
           f'<rect width="{width}" height="{height}" fill="white"/>',
           f'<text x="{left}" y="18" font-size="14" font-weight="bold">'
           f'ssehub soak: server memory and open file descriptors</text>']
    panels = [("RSS MiB", [s["rss_kib"] / 1024 for s in samples], "#1f77b4", "{:,.1f}"),
              ("open fds", [s["fds"] for s in samples], "#d95f02", "{:,.0f}")]
    load_end = max((m for s, m in zip(samples, minutes) if s["phase"] == "run"), default=0)
    for i, (name, values, colour, label) in enumerate(panels):
        y0 = top + i * (panel + gap)  # the panel's top edge
        y_max = max(values) * 1.1 or 1
        y_step = nice_step(y_max, 4)

        def y_of(v):
            return y0 + panel - panel * v / y_max

        out.append(f'<rect x="{left}" y="{y0}" width="{plot_w}" height="{panel}" '
                   f'fill="none" stroke="#999"/>')
        v = 0
        while v <= y_max:
            y = y_of(v)
            out.append(f'<line x1="{left}" y1="{y:.1f}" x2="{left + plot_w}" y2="{y:.1f}" '
                       f'stroke="#eee"/>')
            out.append(f'<text x="{left - 6}" y="{y + 4:.1f}" text-anchor="end">{v:g}</text>')
            v += y_step
        out.append(f'<text x="16" y="{y0 + panel / 2}" text-anchor="middle" fill="{colour}" '
                   f'transform="rotate(-90 16 {y0 + panel / 2})">{name}</text>')
        out.append(f'<line x1="{x_of(load_end):.1f}" y1="{y0}" x2="{x_of(load_end):.1f}" '
                   f'y2="{y0 + panel}" stroke="#999" stroke-dasharray="4 3"/>')
        if i == 0:
            out.append(f'<text x="{x_of(load_end) - 4:.1f}" y="{y0 + panel - 6}" '
                       f'text-anchor="end" fill="#666">load ends</text>')
        points = " ".join(f"{x_of(m):.1f},{y_of(v):.1f}" for m, v in zip(minutes, values))
        out.append(f'<polyline points="{points}" fill="none" stroke="{colour}" stroke-width="2"/>')
        for s, m, v in zip(samples, minutes, values):
            if s["phase"] != "run":  # the idle server before the load, and after everyone left
                anchor = "start" if s["phase"] == "idle" else "end"
                out.append(f'<circle cx="{x_of(m):.1f}" cy="{y_of(v):.1f}" r="3.5" '
                           f'fill="{colour}"/>')
                out.append(f'<text x="{x_of(m):.1f}" y="{y_of(v) - 8:.1f}" '
                           f'text-anchor="{anchor}">{s["phase"]}: {label.format(v)}</text>')
    axis_y = top + 2 * panel + gap
    m = 0
    while m <= x_end + 1e-9:
        x = x_of(m)
        out.append(f'<line x1="{x:.1f}" y1="{axis_y}" x2="{x:.1f}" y2="{axis_y + 5}" stroke="#999"/>')
        out.append(f'<text x="{x:.1f}" y="{axis_y + 18}" text-anchor="middle">{m:g}</text>')
        m += x_step
    out.append(f'<text x="{left + plot_w / 2}" y="{axis_y + 36}" text-anchor="middle">'
               f'minutes since the start of the load</text>')
    out.append("</svg>")
    return "\n".join(out) + "\n"


def span(secs):
    """10 s, 5 minutes, 30.2 minutes."""
    if secs < 60:
        return f"{secs:.3g} s"
    return f"{secs / 60:.3g} minute" + ("" if round(secs) == 60 else "s")


def soak_section(path, report):
    """The soak's settings, summary, abridged samples and a link to its plot."""
    st, m, samples = report["settings"], report["summary"], report["samples"]
    name = os.path.splitext(os.path.basename(path))[0]
    mib = lambda k: f"{k / 1024:,.1f}"
    # Soaks run before `away_secs` was recorded do not say how long resuming readers stayed away.
    away = " after {:g}–{:g} s".format(*st["away_secs"]) if "away_secs" in st else ""
    out = []
    out.append(f"From `{path}`: {span(st['duration_secs'])} against "
               f"{report['target']}; {fmt(st['subscribers'])} reading subscribers at any time, "
               f"each staying {st['lifetime_secs'][0]:g}–{st['lifetime_secs'][1]:g} s, "
               f"{st['resume'] * 100:g} % of those leaving coming back{away} with "
               f"`Last-Event-ID`; {st['slow']} that never read; {st['topics']} topics, "
               f"{fmt(st['rate'])} updates/s of {st['size']} bytes; {st['bad_rate']:g} bad "
               f"request/s; a sample every {st['sample_secs']:g} s.")
    out.append("")
    out.append(f"![Server RSS and open file descriptors during the soak]({name}.svg)")
    out.append("")
    out.append("| server | idle, before | first sample | min | max | last sample | after all left |")
    out.append("|---|---|---|---|---|---|---|")
    keys = ["idle", "first", "min", "max", "last", "after"]
    out.append("| RSS MiB | " + " | ".join(mib(m["rss_kib"][k]) for k in keys) + " |")
    out.append("| open fds | " + " | ".join(fmt(m["fds"][k]) for k in keys) + " |")
    out.append("")
    rows = [
        ("subscriber connections", f"{fmt(m['connects'])} opened ({fmt(m['resumed'])} resumed with "
                                   f"`Last-Event-ID`, {fmt(m['slow_connects'])} slow), "
                                   f"{fmt(m['connect_failed'])} failed"),
        ("readers checked when they left", fmt(m["sessions_checked"])),
        ("lost / duplicates", f"{fmt(m['lost'])} / {fmt(m['duplicates'])}"),
        ("… of which across a resume", f"{fmt(m['resumed_lost'])} / {fmt(m['resumed_duplicates'])} "
                                       f"({fmt(m['replayed'])} updates replayed)"),
        ("updates published", f"{fmt(m['published'])} ({fmt(m['publish_failed'])} failed)"),
        ("deliveries", fmt(m["delivered"])),
        ("latency p50 / p99 / max ms", f"{fmt(m['latency_ms']['p50'], 2)} / "
                                       f"{fmt(m['latency_ms']['p99'], 2)} / {fmt(m['latency_ms']['max'], 1)}"),
        ("slow subscribers dropped by the hub", f"{fmt(m['slow_dropped'])} seen by the bench "
                                                f"({fmt(m['slow_kept'])} still connected after "
                                                f"{fmt(m['slow_patience'])} updates); the hub "
                                                f"counted {fmt(m['hub_slow_dropped'])}"),
        ("bad requests answered as expected / not", f"{fmt(m['bad_as_expected'])} / "
                                                    f"{fmt(m['bad_unexpected'])}"),
        ("readers cut off by the server", fmt(m["readers_cut"])),
        ("errors", fmt(m["errors"]) + (f" (first: {m['first_error']})" if m["first_error"] else "")),
        ("CPU seconds: server / bench", f"{fmt(m['server_cpu_secs'], 1)} / "
                                        f"{fmt(m['bench_cpu_secs'], 1)} "
                                        f"({m['server_cpu_secs'] / st['duration_secs']:.2f} / "
                                        f"{m['bench_cpu_secs'] / st['duration_secs']:.2f} of a core)"),
    ]
    out.append("| | |")
    out.append("|---|---|")
    out += [f"| {k} | {v} |" for k, v in rows]
    out.append("")
    # One row per 5 minutes (fewer for a short soak), with the first and last of the load.
    run = [s for s in samples if s["phase"] == "run"]
    step = 300 if st["duration_secs"] >= 1200 else max(st["sample_secs"], st["duration_secs"] / 6)
    picked, due = [], 0.0
    for i, s in enumerate(run):
        if s["elapsed_secs"] + st["sample_secs"] / 2 >= due or i in (0, len(run) - 1):
            if s not in picked:
                picked.append(s)
            while due <= s["elapsed_secs"] + st["sample_secs"] / 2:
                due += step
    picked = [s for s in samples if s["phase"] == "idle"] + picked \
        + [s for s in samples if s["phase"] == "after"]
    out.append(f"Samples, one per {span(step)} of the {len(run)} taken (all of them are in "
               f"`{path}`):")
    out.append("")
    out.append("| time | RSS MiB | open fds | subscribers (bench / hub) | connects | "
               "disconnects | published | delivered | slow dropped | lost | errors |")
    out.append("|---|---|---|---|---|---|---|---|---|---|---|")
    for s in picked:
        secs = round(s["elapsed_secs"])
        when = f"{secs // 60}:{secs % 60:02}" if s["phase"] == "run" else s["phase"]
        out.append(f"| {when} | {mib(s['rss_kib'])} | {fmt(s['fds'])} | {fmt(s['subscribers'])} / "
                   f"{fmt(s['hub_subscribers'])} | {fmt(s['connects'])} | {fmt(s['disconnects'])} | "
                   f"{fmt(s['published'])} | {fmt(s['delivered'])} | {fmt(s['slow_dropped'])} | "
                   f"{fmt(s['lost'])} | {fmt(s['errors'])} |")
    return name, "\n".join(out)


DESCRIPTIONS = {
    "S1": "steady fan-out: 1,000 subscribers, 2,000 updates at 200/s, 100 bytes",
    "S2": "wide fan-out: 10,000 subscribers, 300 updates at 20/s (3 million deliveries)",
    "S4": "slow consumers: 200 subscribers + 5 that never read, 5,000 updates of 4 KiB at 500/s",
    "S4-noslow": "S4 without the 5 slow subscribers (the reference for S4's p99)",
    "S5": "idle connections: 19,000 subscribers, one update; memory per subscriber",
    "S6": "many topics: 10,000 subscribers spread over 1,000 topics, 2,000 updates at 200/s to random topics",
    "S1-tls": "S1 over TLS, HTTP/1.1 (every peer serves the same self-signed certificate)",
    "S1-h2": "S1 over TLS, HTTP/2, 10 event streams per connection",
    "S5-tls": "idle subscribers over TLS, HTTP/1.1; memory per subscriber",
    "S5-h2-single": "idle subscribers over TLS, HTTP/2, one stream per connection",
    "S5-h2": "idle subscribers over TLS, HTTP/2, 10 streams per connection; memory per stream",
}
TLS_LABELS = ["S1-tls", "S1-h2", "S5-tls", "S5-h2-single", "S5-h2"]


def idle_table():
    """Idle memory by what carries a subscriber, as the issue of TLS and HTTP/2 frames it."""
    rows = [("plain HTTP/1.1 (S5)", "S5"), ("TLS, HTTP/1.1 (S5-tls)", "S5-tls"),
            ("TLS, HTTP/2, one stream per connection (S5-h2-single)", "S5-h2-single"),
            ("TLS, HTTP/2, 10 streams per connection (S5-h2)", "S5-h2")]
    rows = [(name, label) for name, label in rows if any(k[0] == label for k in runs)]
    if not any(label != "S5" for _, label in rows):
        return None
    out = ["| idle subscriber over, RSS KiB per subscriber (per connection) | "
           + " | ".join(PEER_NAMES[p] for p in peers) + " |",
           "|---|" + "---|" * len(peers)]
    for name, label in rows:
        cells = []
        for p in peers:
            reports = runs.get((label, p), [])
            sub = med([get(r, "server.rss_per_subscriber_kib") for r in reports])
            conn = med([get(r, "server.rss_per_connection_kib") for r in reports])
            if sub is None:
                cells.append("—")
            elif conn is not None and abs(conn - sub) > 0.005:
                cells.append(f"{fmt(sub, 2)} ({fmt(conn, 2)})")
            else:
                cells.append(fmt(sub, 2))
        out.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(out)

PEER_COLOURS = {"ssehub": "#1f77b4", "ssehub_memory": "#6baed6", "baseline": "#999999", "nchan": "#d95f02"}


def bars_svg(title, unit, path, labels, log=False):
    """Grouped bars, one group per scenario and one bar per peer (medians), as an SVG.

    Hand-written like the soak's plot, for the same reason: no dependency to install.
    """
    groups = []
    for label in labels:
        values = [med([get(r, path) for r in runs.get((label, p), [])]) for p in peers]
        if any(v is not None for v in values):
            groups.append((label, values))
    if not groups:
        return None
    top_value = max(v for _, vs in groups for v in vs if v is not None) * 1.15
    low = 0.1 if log else 0.0
    width, left, right, top, plot_h = 760, 80, 20, 52, 260
    plot_w = width - left - right
    height = top + plot_h + 40

    def y_of(v):
        v = max(v, low)
        if log:
            frac = (math.log10(v) - math.log10(low)) / (math.log10(top_value) - math.log10(low))
        else:
            frac = v / top_value
        return top + plot_h - plot_h * frac

    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
           f'viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="12">',
           f'<rect width="{width}" height="{height}" fill="white"/>',
           f'<text x="{left}" y="18" font-size="14" font-weight="bold">{title}</text>']
    x = left
    for p in peers:  # legend
        out.append(f'<rect x="{x}" y="28" width="12" height="12" fill="{PEER_COLOURS[p]}"/>')
        out.append(f'<text x="{x + 16}" y="38">{PEER_NAMES[p]}</text>')
        x += 30 + 7 * len(PEER_NAMES[p])
    ticks = []
    if log:
        t = low
        while t <= top_value:
            ticks.append(t)
            t *= 10
    else:
        step = nice_step(top_value, 5)
        ticks = [i * step for i in range(int(top_value / step) + 1)]
    for t in ticks:
        y = y_of(t)
        out.append(f'<line x1="{left}" y1="{y:.1f}" x2="{left + plot_w}" y2="{y:.1f}" stroke="#eee"/>')
        out.append(f'<text x="{left - 6}" y="{y + 4:.1f}" text-anchor="end">{t:,.{0 if t >= 1 or t == 0 else 1}f}</text>')
    out.append(f'<text x="16" y="{top + plot_h / 2}" text-anchor="middle" '
               f'transform="rotate(-90 16 {top + plot_h / 2})">{unit}</text>')
    group_w = plot_w / len(groups)
    bar_w = group_w * 0.7 / len(peers)
    for g, (label, values) in enumerate(groups):
        gx = left + g * group_w + group_w * 0.15
        for i, (p, v) in enumerate(zip(peers, values)):
            if v is None:
                continue
            y = y_of(v)
            bx = gx + i * bar_w
            out.append(f'<rect x="{bx:.1f}" y="{y:.1f}" width="{bar_w - 2:.1f}" '
                       f'height="{top + plot_h - y:.1f}" fill="{PEER_COLOURS[p]}"/>')
            text = f"{v / 1000:,.0f}k" if v >= 10000 else f"{v:,.{0 if v >= 10 else 1}f}"
            out.append(f'<text x="{bx + bar_w / 2 - 1:.1f}" y="{y - 4:.1f}" '
                       f'text-anchor="middle" font-size="10">{text}</text>')
        out.append(f'<text x="{left + g * group_w + group_w / 2:.1f}" y="{top + plot_h + 18}" '
                   f'text-anchor="middle">{label}</text>')
    out.append(f'<line x1="{left}" y1="{top + plot_h}" x2="{left + plot_w}" y2="{top + plot_h}" '
               f'stroke="#999"/>')
    out.append("</svg>")
    return "\n".join(out) + "\n"


def s7_table():
    """S1 on one node, across three nodes on Redis (S7) and across three on NATS (S7-nats)."""
    columns = [("S7-single", "one node"), ("S7-cluster", "three nodes + Redis"),
               ("S7-nats", "three nodes + three NATS servers")]
    columns = [(label, name) for label, name in columns if runs.get((label, "ssehub"))]
    if not any(label != "S7-single" for label, _ in columns):
        return None
    rows = [
        ("delivered", "delivered", 0),
        ("expected", "expected", 0),
        ("lost", "lost", 0),
        ("duplicates", "duplicates", 0),
        ("publish rate achieved /s", "rate_achieved", 0),
        ("latency p50 ms", "latency_ms.p50", 2),
        ("latency p99 ms", "latency_ms.p99", 2),
        ("server CPU s (every node, and the engine's processes)", "server.cpu_secs", 2),
        ("**deliveries per server CPU-second**", "server.deliveries_per_cpu_sec", 0),
        ("bench CPU s", "bench_cpu_secs", 2),
    ]
    out = ["| | " + " | ".join(name for _, name in columns) + " |",
           "|---|" + "---|" * len(columns)]
    for name, path, digits in rows:
        out.append(f"| {name} | "
                   + " | ".join(cell(label, "ssehub", path, digits) for label, _ in columns)
                   + " |")

    def median_of(label, path):
        return med([get(r, path) for r in runs.get((label, "ssehub"), [])])

    per_cpu = {label: median_of(label, "server.deliveries_per_cpu_sec") for label, _ in columns}
    p99 = {label: median_of(label, "latency_ms.p99") for label, _ in columns}
    lines = []
    for label, engine in (("S7-cluster", "Redis"), ("S7-nats", "NATS JetStream")):
        a, b = per_cpu.get("S7-single"), per_cpu.get(label)
        if a and b and p99.get("S7-single") is not None and p99.get(label) is not None:
            lines.append(f"Cluster mode on {engine} costs {(1 - b / a) * 100:.0f} % of the "
                         "deliveries per server CPU-second and changes p99 by "
                         f"{p99[label] - p99['S7-single']:+.1f} ms (targets for Redis: at most "
                         "20 % and 5 ms).")
    redis, nats = per_cpu.get("S7-cluster"), per_cpu.get("S7-nats")
    if redis and nats:
        lines.append(f"NATS takes {(redis / nats - 1) * 100:+.0f} % CPU per delivery against "
                     "Redis (target: at most +30 %).")
    if lines:
        out.append("")
        out.append(" ".join(lines))
    return "\n".join(out)


def lean_table():
    """S2 with `--coalesce 250ms`, next to S2 with the defaults and the baseline's S2."""
    lean = runs.get(("S2-lean", "ssehub"), [])
    if not lean:
        return None
    cols = [("S2", "ssehub", "ssehub, defaults (200 ms)"), ("S2-lean", "ssehub", "ssehub, --coalesce 250ms")]
    if runs.get(("S2", "baseline")):
        cols.append(("S2", "baseline", PEER_NAMES["baseline"]))
    rows = [("lost", "lost", 0), ("latency p50 ms", "latency_ms.p50", 1),
            ("latency p99 ms", "latency_ms.p99", 1), ("server CPU s", "server.cpu_secs", 2),
            ("**deliveries per server CPU-second**", "server.deliveries_per_cpu_sec", 0)]
    out = ["| | " + " | ".join(c[2] for c in cols) + " |", "|---|" + "---|" * len(cols)]
    for name, path, digits in rows:
        out.append(f"| {name} | " + " | ".join(cell(l, p, path, digits) for l, p, _ in cols) + " |")
    a = med([get(r, "server.deliveries_per_cpu_sec") for r in lean])
    b = med([get(r, "server.deliveries_per_cpu_sec") for r in runs.get(("S2", "baseline"), [])])
    pa = med([get(r, "latency_ms.p99") for r in lean])
    pb = med([get(r, "latency_ms.p99") for r in runs.get(("S2", "baseline"), [])])
    if a and b and pa and pb:
        out.append("")
        out.append(f"With `--coalesce 250ms`: {a / b:.2f}× the baseline's deliveries per server "
                   f"CPU-second, at {pa / pb:.2f}× its p99.")
    return "\n".join(out)


def templates_table():
    """S6 with a tenth of the subscribers by URI template, next to S6 (exact topics only)."""
    if not runs.get(("S6-templates", "ssehub")):
        return None
    cols = [("S6", "ssehub", "ssehub, exact topics"),
            ("S6-templates", "ssehub", "ssehub, 10 % by template")]
    if runs.get(("S6", "baseline")):
        cols.append(("S6", "baseline", PEER_NAMES["baseline"] + ", exact topics"))
    rows = [("delivered", "delivered", 0), ("lost", "lost", 0),
            ("latency p50 ms", "latency_ms.p50", 2), ("latency p99 ms", "latency_ms.p99", 2),
            ("server CPU s", "server.cpu_secs", 2),
            ("**deliveries per server CPU-second**", "server.deliveries_per_cpu_sec", 0)]
    out = ["| | " + " | ".join(c[2] for c in cols) + " |", "|---|" + "---|" * len(cols)]
    for name, path, digits in rows:
        out.append(f"| {name} | " + " | ".join(cell(l, p, path, digits) for l, p, _ in cols) + " |")
    return "\n".join(out)


def scale_table():
    labels = sorted({k[0] for k in runs if k[0].startswith("scale-")}, key=lambda s: int(s[6:]))
    if not labels:
        return None
    out = ["| subscribers | server RSS per subscriber KiB | deliveries per server CPU-second | "
           "server CPU per delivery µs | p99 ms | lost |",
           "|---|---|---|---|---|---|"]
    for label in labels:
        rs = runs.get((label, "ssehub"), [])
        kib = med([get(r, "server.rss_per_subscriber_kib") for r in rs])
        dpc = med([get(r, "server.deliveries_per_cpu_sec") for r in rs])
        p99 = med([get(r, "latency_ms.p99") for r in rs])
        lost = med([r["lost"] for r in rs])
        out.append(f"| {int(label[6:]):,} | {fmt(kib, 2)} | {fmt(dpc)} | "
                   f"{fmt(1e6 / dpc if dpc else None, 2)} | {fmt(p99, 1)} | {fmt(lost)} |")
    return "\n".join(out)


print("# Benchmarks")
print()
print("Generated by `bench/compare.sh` (tables) from the JSON in `bench/results/`; the notes at the")
print("end are written by hand: method, targets, how to reproduce, and the history of batches.")
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

charts = [
    ("bench-cpu", "Deliveries per server CPU-second (medians; higher is better)",
     "deliveries / CPU-s", "server.deliveries_per_cpu_sec", False),
    ("bench-p99", "p99 latency, publish to delivery (medians; lower is better; log scale)",
     "ms", "latency_ms.p99", True),
]
for name, title, unit, path, log in charts:
    svg = bars_svg(title, unit, path, ["S1", "S2", "S4", "S4-noslow", "S6"], log)
    if svg:
        with open(os.path.join("docs", f"{name}.svg"), "w") as f:
            f.write(svg)
        print(f"![{title}]({name}.svg)")
        print()

for label in ["S1", "S2", "S3", "S4", "S4-noslow", "S5", "S6"] + TLS_LABELS:
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
    print(scenario_table(label, CONNECTION_METRICS if label in TLS_LABELS else ()))
    if label == "S4":
        print()
        print("| slow subscribers closed by the server by the end | "
              + " | ".join(cell(label, p, "slow_dropped", 0) for p in peers) + " |")
        print("|---|" + "---|" * len(peers))
    print()

t = idle_table()
if t:
    print("## Idle memory by protocol: S5, S5-tls, S5-h2-single and S5-h2 side by side")
    print()
    print(t)
    print()
t = s7_table()
if t:
    print("## S7 — cluster: S1 across three nodes sharing one Redis (S7) or a three-server NATS")
    print("JetStream (S7-nats, stream replicas 3), against S1 on one node")
    print()
    print("Subscribers and publishers are spread over the three nodes in turn; server CPU is the")
    print("sum of the three nodes and `redis-server` (S7) or the three `nats-server` (S7-nats). All")
    print("of it runs on the same two cores.")
    print()
    print(t)
    print()
t = lean_table()
if t:
    print("## S2 with a longer wait")
    print()
    print("The same load as S2, the hub started with `--coalesce 250ms`. At the default write budget")
    print("(20,000 writes a second per core) 10,000 receiving subscribers on two cores call for a")
    print("250 ms window; the default bound holds it at 200 ms, this run lets it be: fewer, fuller writes.")
    print()
    print(t)
    print()
t = templates_table()
if t:
    print("## S6 with URI templates (ssehub alone)")
    print()
    print("S6 again with 1,000 of the 10,000 subscribers (a tenth, spread over the topics) subscribed")
    print("through `bench-N{?sub}`, a URI template matching only their topic, as S6's definition asks")
    print("(\"some by URI template\"); the peers have no templates, so the comparison above is exact")
    print("topics only. Templates are indexed by their text before the first `{`.")
    print()
    print(t)
    print()
t = frontier.section(runs, med, get)
if t:
    print(t)
    print()
t = scale_table()
if t:
    print("## Scaling — ssehub alone, S2's shape (200 updates at 20/s) at 1,000 to 19,000 subscribers")
    print()
    print(t)
    print()

soaks = sorted(glob.glob(os.path.join(results_dir, "soak*.json")))
if soaks:
    print("## Soak")
    print()
    print("`ssehub bench --soak 30m` (or `bench/soak.sh`) keeps a population of subscribers coming")
    print("and going for the whole run and samples the server's resident memory (VmRSS) and open")
    print("file descriptors (`/proc/PID/fd`); the question is whether they stay flat under churn and")
    print("come back once every client has left. Every subscriber is checked when it leaves: each")
    print("update accepted on its topic while it was subscribed must have arrived exactly once.")
    print()
for path in soaks:
    with open(path) as f:
        report = json.load(f)
    name, section = soak_section(path, report)
    if len(soaks) > 1:
        print(f"### {report['label'] or name}")
        print()
    print(section)
    print()
    with open(os.path.join("docs", f"{name}.svg"), "w") as f:
        f.write(soak_svg(report))

notes = ""
try:
    with open("docs/BENCHMARKS.md") as f:
        text = f.read()
    if NOTES in text:
        notes = text.split(NOTES, 1)[1]
except OSError:
    pass
print(NOTES, end="")
print(notes if notes else "\n", end="")
