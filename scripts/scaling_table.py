#!/usr/bin/env python3
"""Markdown scaling table from several ``python -m fastbn bench --json`` files (one per thread count).

    bash scripts/scaling.sh scaling 1 4 16
    python scripts/scaling_table.py scaling/bench_*t.json

For each (shape, op): fastbn's median at each thread count, its speedup over its own one-thread
time (the lowest count given), its speedup over PyTorch at the same count, and its fraction of the
copy roofline measured in the same run.  Then the per-op geometric means and the copy bandwidth per
thread count.  Standard library only.
"""

import argparse
import json
import math
import sys


def load(paths):
    runs = []
    for p in paths:
        with open(p) as f:
            doc = json.load(f)
        runs.append((doc["config"]["threads"], doc))
    runs.sort(key=lambda r: r[0])
    return runs


def fmt_ms(s):
    if s is None:
        return "–"
    v = s * 1e3
    return f"{v:.3g}" if v < 10 else f"{v:.1f}"


def fmt_x(r):
    return "–" if r is None or not math.isfinite(r) else f"{r:.2f}×"


def geomean(vals):
    vals = [v for v in vals if v is not None and v > 0 and math.isfinite(v)]
    return math.exp(sum(map(math.log, vals)) / len(vals)) if vals else None


def render(runs):
    counts = [t for t, _ in runs]
    base_t = counts[0]
    index = [{(r["label"], r["op"]): r for r in doc["results"]} for _, doc in runs]
    keys = [(r["label"], r["op"]) for r in runs[0][1]["results"]]
    head = (["shape", "op"] + [f"fastbn ms @{t}" for t in counts]
            + [f"scaling {t}/{base_t}" for t in counts[1:]]
            + [f"vs PyTorch @{t}" for t in counts] + [f"roofline @{t}" for t in counts])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * 2 + "---:|" * (len(head) - 2)]
    per_op = {}
    for key in keys:
        rows = [ix.get(key) for ix in index]
        if any(r is None for r in rows):
            continue
        t = [r["fastbn_s"] for r in rows]
        scal = [t[0] / v if v else None for v in t[1:]]
        vs = [r["speedup_vs_torch"] for r in rows]
        roof = [r["roofline_fraction"] for r in rows]
        acc = per_op.setdefault(key[1], {"scal": [[] for _ in scal], "vs": [[] for _ in vs],
                                         "roof": [[] for _ in roof]})
        for name, vals in (("scal", scal), ("vs", vs), ("roof", roof)):
            for i, v in enumerate(vals):
                acc[name][i].append(v)
        lines.append("| " + " | ".join(
            [key[0], key[1]] + [fmt_ms(v) for v in t] + [fmt_x(v) for v in scal]
            + [fmt_x(v) for v in vs] + ["–" if v is None else f"{v:.2f}" for v in roof]) + " |")
    lines += ["", "| op (geometric mean) | " + " | ".join(head[2 + len(counts):]) + " |",
              "|---|" + "---:|" * (len(head) - 2 - len(counts))]
    for op, acc in per_op.items():
        cells = ([fmt_x(geomean(v)) for v in acc["scal"]] + [fmt_x(geomean(v)) for v in acc["vs"]]
                 + [f"{geomean(v):.2f}" if geomean(v) else "–" for v in acc["roof"]])
        lines.append(f"| {op} | " + " | ".join(cells) + " |")
    # Copy bandwidth (read + write) on the largest tensor of the suite, per thread count.
    lines += ["", "| threads | copy GB/s (largest tensor, read+write) | machine |", "|---:|---:|---|"]
    for t, doc in runs:
        big = max(doc["results"], key=lambda r: r["shape"]["nbytes"])
        gbs = 2 * big["shape"]["nbytes"] / big["copy_s"] / 1e9 if big.get("copy_s") else None
        m = doc["machine"]
        lines.append(f"| {t} | {gbs:.1f} | {m.get('cpu')}, {m.get('available_cores')} cores, "
                     f"numba {m.get('numba')} ({m.get('threading_layer')}), torch {m.get('torch')} |")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("json", nargs="+", help="bench --json files, one per thread count")
    args = ap.parse_args(argv)
    print(render(load(args.json)))


if __name__ == "__main__":
    sys.exit(main())
