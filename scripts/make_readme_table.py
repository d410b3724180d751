#!/usr/bin/env python3
"""Turn a ``python -m fastbn bench --json`` file into the README's markdown speed table.

    python -m fastbn bench --json bench.json
    python scripts/make_readme_table.py bench.json > table.md

Prints one row per (shape, op) -- fastbn, PyTorch and NumPy medians in ms, speedup vs PyTorch,
roofline fraction -- then the per-op geometric means and a footnote with the machine, versions,
thread count and the exact command, so the table can always be traced back to a real run.
Standard library only: it runs without fastbn installed.
"""

import argparse
import json
import math
import sys

OP_TITLES = {"train": "forward-train", "infer": "inference", "backward": "backward",
             "stats": "channel stats"}


def ms(seconds):
    if seconds is None:
        return "–"
    v = seconds * 1e3
    if v >= 100:
        return f"{v:.0f}"
    if v >= 10:
        return f"{v:.1f}"
    if v >= 1:
        return f"{v:.2f}"
    return f"{v:.3g}"  # sub-millisecond: three significant digits (per-call overhead territory)


def ratio(r, suffix="×"):
    if r is None or not math.isfinite(r):
        return "–"
    return f"{r:.2f}{suffix}" if r < 100 else f"{r:.0f}{suffix}"


def fraction(f):
    return "–" if f is None else f"{f:.2f}"


def tie(r):
    """``~`` where the middle half of the per-round ratios straddles 1 (bench --json
    ``standing_vs_torch``; older files have none)."""
    return "~" if r.get("standing_vs_torch") == "tie" else ""


def shape_cell(r):
    s = r["shape"]
    dims = "×".join(str(d) for d in s["shape"])
    dt = {"float32": "f32", "float64": "f64"}.get(s["dtype"], s["dtype"])
    layout = " NHWC" if s["axis"] in (-1, len(s["shape"]) - 1) and len(s["shape"]) > 2 else ""
    return f"`{s['name']}` {dims}{layout} {dt}"


def render(doc):
    has_torch = doc.get("peers", {}).get("torch", {}).get("available", False)
    lines = [
        "| shape | op | fastbn ms | PyTorch ms | NumPy ms | speedup vs PyTorch | roofline |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    last = None
    for r in doc["results"]:
        cell = shape_cell(r)
        shown = cell if cell != last else ""
        last = cell
        flag = "" if r.get("check_ok", True) else " ⚠"
        lines.append(
            f"| {shown} | {OP_TITLES.get(r['op'], r['op'])} | {ms(r.get('fastbn_s'))}{flag} | "
            f"{ms(r.get('torch_s')) if has_torch else 'n/a'} | {ms(r.get('numpy_s'))} | "
            f"{tie(r)}{ratio(r.get('speedup_vs_torch')) if has_torch else 'n/a'} | "
            f"{fraction(r.get('roofline_fraction'))} |"
        )
    lines += ["", "| geometric mean | cases | speedup vs PyTorch | speedup vs NumPy | roofline |",
              "|---|---:|---:|---:|---:|"]
    for op, g in doc.get("geomean", {}).items():
        rf = g.get("roofline_fraction")
        lines.append(
            f"| {OP_TITLES.get(op, op)} | {g.get('cases', '')} | "
            f"{ratio(g.get('speedup_vs_torch')) if has_torch else 'n/a'} | "
            f"{ratio(g.get('speedup_vs_numpy'))} | {fraction(rf)} |"
        )
    m, cfg = doc.get("machine", {}), doc.get("config", {})
    versions = ", ".join(
        f"{name} {m[key]}" for name, key in (("fastbn", "fastbn"), ("Numba", "numba"),
                                            ("NumPy", "numpy"), ("PyTorch", "torch"),
                                            ("ONNX Runtime", "onnxruntime"), ("Python", "python"))
        if m.get(key))
    layouts = sorted({r["shape"]["name"] for r in doc["results"]
                      if r.get("torch_layout") not in (None, "contiguous")})
    notes = [
        f"Machine: {m.get('cpu', '?')}, {m.get('available_cores', '?')} cores, "
        f"{m.get('platform', '')}. Threads: {cfg.get('threads', '?')} for fastbn (Numba "
        f"threading layer {m.get('threading_layer', '?')}), the copy and PyTorch.",
        f"Versions: {versions}.",
        f"Command: `{doc.get('command', 'python -m fastbn bench')}` "
        f"({doc.get('started', '')}; medians of interleaved calls in a shuffled order after "
        f"a warm-up call, budget {cfg.get('budget_s', '?')} s / at most {cfg.get('repeat', '?')} calls per "
        "contender).",
        "PyTorch = `torch.ops.aten.native_batch_norm` / `native_batch_norm_backward` (no "
        "autograd), `torch.var_mean(correction=0)` for stats"
        + (f"; channels-last shapes ({', '.join(layouts)}) as `torch.channels_last` tensors."
           if layouts else "."),
        "~ = a tie within the run's noise: the middle half of the per-round speedups (fastbn "
        "and PyTorch timed in the same round) spans 1.",
        "Roofline = time of a parallel copy of the tensor × bytes moved / 2B (inference 2B, "
        "forward-train 3B, backward 5B, stats 1B); fraction = roofline ÷ fastbn time, above 1 when "
        "the tensor fits in cache.",
    ]
    load = m.get("load", {}).get("others_cpu_fraction")
    if load is not None and load > 0.10:
        notes.append(f"Warning: other processes used {load:.0%} of the CPUs during this run.")
    lines += [""] + [f"<sup>{i}</sup> {n}  " for i, n in enumerate(notes, 1)]
    return "\n".join(lines).rstrip() + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("json", help="output of python -m fastbn bench --json PATH")
    args = p.parse_args(argv)
    try:
        with open(args.json, encoding="utf-8") as fh:
            doc = json.load(fh)
    except (OSError, ValueError) as exc:
        print(f"make_readme_table: cannot read {args.json}: {exc}", file=sys.stderr)
        return 2
    if "results" not in doc:
        print(f"make_readme_table: {args.json} is not a fastbn bench --json file", file=sys.stderr)
        return 2
    sys.stdout.write(render(doc))
    return 0


if __name__ == "__main__":
    sys.exit(main())
