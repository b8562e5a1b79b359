"""The batching frontier: S1 run at several batching settings of ssehub, against the peers' S1.

bench/compare.sh's FRONTIER scenario saves one JSON per setting and run as
FRONTIER-<point>-ssehub-<run>.json, where <point> is `coalesce0` (no deliberate batching) or
`wbN` (`--write-budget N`). This module turns them into a table and a plot of p99 latency against
deliveries per server CPU-second, with the peers' S1 medians of the same batch as single points:
the closer to the bottom right, the better. summarize.py calls `section`.
"""
import math
import os
import re

# Peer markers; ssehub's settings are joined by a line in budget order.
COLOURS = {"ssehub": "#1f77b4", "default": "#2ca02c", "baseline": "#999999", "nchan": "#d95f02"}


def point_flags(point):
    if point == "coalesce0":
        return "--coalesce 0"
    m = re.fullmatch(r"wb(\d+)", point)
    return f"--write-budget {int(m.group(1)):,}" if m else point


def point_order(point):
    """No batching first, then from the largest budget (least batching) to the smallest."""
    if point == "coalesce0":
        return (0, 0)
    m = re.fullmatch(r"wb(\d+)", point)
    return (1, -int(m.group(1))) if m else (2, 0)


def collect(runs, med, get):
    """[(name, flags, deliveries/CPU-s, p50, p99, lost, n_runs, is_ssehub)] in plotting order."""
    rows = []
    points = sorted({label[len("FRONTIER-"):] for (label, peer) in runs
                     if label.startswith("FRONTIER-") and peer == "ssehub"}, key=point_order)
    for point in points:
        reports = runs[(f"FRONTIER-{point}", "ssehub")]
        rows.append((f"ssehub {point_flags(point)}", point_flags(point),
                     med([get(r, "server.deliveries_per_cpu_sec") for r in reports]),
                     med([get(r, "latency_ms.p50") for r in reports]),
                     med([get(r, "latency_ms.p99") for r in reports]),
                     sum(get(r, "lost") or 0 for r in reports), len(reports), "ssehub"))
    for peer, name, flags in (("ssehub", "ssehub default", "(S1: --write-budget auto)"),
                              ("baseline", "naive axum + broadcast", "(S1, same batch)"),
                              ("nchan", "nginx + nchan", "(S1, same batch)")):
        reports = runs.get(("S1", peer), [])
        if reports and points:
            rows.append((name, flags,
                         med([get(r, "server.deliveries_per_cpu_sec") for r in reports]),
                         med([get(r, "latency_ms.p50") for r in reports]),
                         med([get(r, "latency_ms.p99") for r in reports]),
                         sum(get(r, "lost") or 0 for r in reports), len(reports),
                         "default" if peer == "ssehub" else peer))
    return rows


def table(rows):
    out = ["| server | flags | deliveries per server CPU-second | latency p50 ms | latency p99 ms | lost | runs |",
           "|---|---|---|---|---|---|---|"]
    for name, flags, cpu, p50, p99, lost, n, _ in rows:
        def f(v, d):
            return "—" if v is None else f"{v:,.{d}f}"
        out.append(f"| {name.split(' --')[0]} | {flags} | {f(cpu, 0)} | {f(p50, 2)} | {f(p99, 2)} | {lost:,} | {n} |")
    return "\n".join(out)


def svg(rows):
    """p99 (log scale) against deliveries per CPU-second; hand-written like summarize.py's plots."""
    pts = [r for r in rows if r[2] is not None and r[4] is not None]
    if not pts:
        return None
    width, left, right, top, plot_h = 760, 80, 30, 40, 320
    plot_w = width - left - right
    height = top + plot_h + 50
    x_max = max(r[2] for r in pts) * 1.1
    y_lo = 10 ** math.floor(math.log10(max(min(r[4] for r in pts), 0.1)))
    y_hi = 10 ** math.ceil(math.log10(max(r[4] for r in pts) * 1.05))

    def xy(r):
        x = left + plot_w * r[2] / x_max
        frac = (math.log10(r[4]) - math.log10(y_lo)) / (math.log10(y_hi) - math.log10(y_lo))
        return x, top + plot_h - plot_h * frac

    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
           f'viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="12">',
           f'<rect width="{width}" height="{height}" fill="white"/>',
           f'<text x="{left}" y="18" font-size="14" font-weight="bold">S1: p99 latency against '
           f'deliveries per server CPU-second (medians; lower right is better)</text>']
    t = y_lo
    while t <= y_hi * 1.0001:
        frac = (math.log10(t) - math.log10(y_lo)) / (math.log10(y_hi) - math.log10(y_lo))
        y = top + plot_h - plot_h * frac
        out.append(f'<line x1="{left}" y1="{y:.1f}" x2="{left + plot_w}" y2="{y:.1f}" stroke="#eee"/>')
        out.append(f'<text x="{left - 6}" y="{y + 4:.1f}" text-anchor="end">{t:g} ms</text>')
        t *= 10
    step = 10 ** math.floor(math.log10(x_max / 5))
    while x_max / step > 8:
        step *= 2
    k = 0
    while k * step <= x_max:
        x = left + plot_w * k * step / x_max
        out.append(f'<line x1="{x:.1f}" y1="{top}" x2="{x:.1f}" y2="{top + plot_h}" stroke="#f4f4f4"/>')
        out.append(f'<text x="{x:.1f}" y="{top + plot_h + 16}" text-anchor="middle">{k * step / 1000:,.0f}k</text>')
        k += 1
    out.append(f'<text x="{left + plot_w / 2}" y="{top + plot_h + 36}" text-anchor="middle">'
               f'deliveries per server CPU-second</text>')
    line = [xy(r) for r in pts if r[7] == "ssehub"]
    if len(line) > 1:
        out.append('<polyline fill="none" stroke="#1f77b4" stroke-width="1.5" points="'
                   + " ".join(f"{x:.1f},{y:.1f}" for x, y in line) + '"/>')
    for r in pts:
        x, y = xy(r)
        colour = COLOURS[r[7]]
        label = r[1] if r[7] == "ssehub" else r[0]
        out.append(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="5" fill="{colour}"/>')
        # Labels on the right half go to the left of their point, so that none is cut off.
        if x > left + plot_w * 0.6:
            out.append(f'<text x="{x - 8:.1f}" y="{y - 6:.1f}" font-size="10" text-anchor="end">{label}</text>')
        else:
            out.append(f'<text x="{x + 8:.1f}" y="{y - 6:.1f}" font-size="10">{label}</text>')
    out.append(f'<rect x="{left}" y="{top}" width="{plot_w}" height="{plot_h}" fill="none" stroke="#999"/>')
    out.append("</svg>")
    return "\n".join(out) + "\n"


def section(runs, med, get, docs="docs"):
    """The frontier's markdown (table and plot), writing docs/bench-frontier.svg; None without data."""
    rows = collect(runs, med, get)
    if not rows:
        return None
    picture = svg(rows)
    text = ["## The batching frontier — S1 at several batching settings (ssehub) against the peers",
            "",
            "The same S1 load at each setting, from no deliberate batching (`--coalesce 0`) through",
            "larger to smaller write budgets (more batching); the peers' points are their S1 runs of",
            "the same batch.",
            "",
            table(rows)]
    if picture:
        with open(os.path.join(docs, "bench-frontier.svg"), "w") as f:
            f.write(picture)
        text += ["", "![S1: p99 latency against deliveries per server CPU-second](bench-frontier.svg)"]
    return "\n".join(text)
