#!/usr/bin/env python3
"""Turns `waft bench --compare-etcd --output json` lines into a Markdown table and an SVG plot
(throughput and p99 latency by client count, waft vs etcd). Standard library only."""
import json
import sys


def main(src, md_path, svg_path):
    rows = []
    with open(src) as f:
        for line in f:
            line = line.strip()
            if line:
                d = json.loads(line)
                w, e = d["results"][0], d["results"][1]
                rows.append((d["workload"]["clients"], w, e, d["ratio"]))
    rows.sort(key=lambda r: r[0])
    with open(md_path, "w") as f:
        f.write("| clients | waft ops/s | etcd ops/s | ratio | waft p50 ms | etcd p50 ms | waft p99 ms | etcd p99 ms | p99 ratio |\n")
        f.write("|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n")
        for c, w, e, r in rows:
            f.write(
                f"| {c} | {w['ops_per_sec']:.0f} | {e['ops_per_sec']:.0f} | {r['throughput']:.2f}x "
                f"| {w['latency_ms']['p50']:.2f} | {e['latency_ms']['p50']:.2f} "
                f"| {w['latency_ms']['p99']:.2f} | {e['latency_ms']['p99']:.2f} | {r['p99_latency']:.2f}x |\n"
            )
    write_svg(rows, svg_path)


def write_svg(rows, path):
    W, H, pad = 760, 320, 50
    panel = (W - 3 * pad) / 2
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" font-family="sans-serif" font-size="12">',
           f'<rect width="{W}" height="{H}" fill="white"/>']

    def plot(x0, title, key):
        values = [(c, key(w), key(e)) for c, w, e, _ in rows]
        top = max([max(a, b) for _, a, b in values] + [1e-9]) * 1.1
        n = len(values)
        out.append(f'<text x="{x0 + panel / 2}" y="20" text-anchor="middle" font-weight="bold">{title}</text>')
        out.append(f'<line x1="{x0}" y1="{H - pad}" x2="{x0 + panel}" y2="{H - pad}" stroke="black"/>')
        out.append(f'<line x1="{x0}" y1="{pad}" x2="{x0}" y2="{H - pad}" stroke="black"/>')
        for t in range(5):
            v = top * t / 4
            y = H - pad - (H - 2 * pad) * t / 4
            out.append(f'<text x="{x0 - 4}" y="{y + 4}" text-anchor="end">{v:.0f}</text>')
        for series, color, idx in (("waft", "#1f77b4", 1), ("etcd", "#d62728", 2)):
            pts = []
            for i, v in enumerate(values):
                x = x0 + panel * (i + 0.5) / max(n, 1)
                y = H - pad - (H - 2 * pad) * v[idx] / top
                pts.append(f"{x:.1f},{y:.1f}")
                out.append(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="3" fill="{color}"/>')
            out.append(f'<polyline points="{" ".join(pts)}" fill="none" stroke="{color}" stroke-width="2"/>')
        for i, v in enumerate(values):
            x = x0 + panel * (i + 0.5) / max(n, 1)
            out.append(f'<text x="{x:.1f}" y="{H - pad + 16}" text-anchor="middle">{v[0]}</text>')
        out.append(f'<text x="{x0 + panel / 2}" y="{H - 10}" text-anchor="middle">clients</text>')

    plot(pad, "puts/s (higher is better)", lambda r: r["ops_per_sec"])
    plot(2 * pad + panel, "p99 latency, ms (lower is better)", lambda r: r["latency_ms"]["p99"])
    out.append(f'<text x="{W - pad}" y="40" text-anchor="end" fill="#1f77b4">waft</text>')
    out.append(f'<text x="{W - pad}" y="56" text-anchor="end" fill="#d62728">etcd</text>')
    out.append("</svg>")
    with open(path, "w") as f:
        f.write("\n".join(out) + "\n")


def summary():
    d = json.load(sys.stdin)
    for r in d["results"]:
        lat = r["latency_ms"]
        print(f"  {r['target']:5} {r['ops_per_sec']:9.1f} ops/s  p50 {lat['p50']:.2f} ms  p99 {lat['p99']:.2f} ms"
              f"  ({r['errors']} errors)", file=sys.stderr)


if __name__ == "__main__":
    if sys.argv[1:] == ["--summary"]:
        summary()
    else:
        main(*sys.argv[1:4])
