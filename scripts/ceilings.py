#!/usr/bin/env python3
"""How far ahead of PyTorch any implementation could be, from a ``python -m fastbn bench
--json`` file.

    python scripts/ceilings.py docs/bench.json

For each case, the *floor* is the least memory traffic the op needs -- every input read once,
every output written once: inference and forward-train 2 bytes per tensor byte (``x`` in,
``y`` out), backward 3 (``x`` and ``dy`` in, ``dx`` out), statistics 1 -- moved at the
bandwidth of the parallel copy timed in the same run.  ``PyTorch / floor`` is then the largest
speedup over PyTorch that a kernel streaming at copy bandwidth could show there; the geometric
mean over the cases bounds the geometric-mean speedup the bench can report for the op.  Tensors
that stay in cache are measured against a copy in cache, so their floors are cache-bandwidth
floors: arithmetic, not traffic, usually bounds the kernels there, which only lowers what is
reachable.  The floors are estimates, not bounds: the copy's stores may first read their lines
(write-allocate), so ops that mostly read (statistics) can beat theirs on tensors streamed
from memory.  Standard library only.
"""

import argparse
import json
import math

from make_readme_table import OP_TITLES  # this script's folder is on the path when run

FLOOR_BYTES = {"infer": 2, "train": 2, "backward": 3, "stats": 1}


def geomean(values):
    return math.exp(sum(map(math.log, values)) / len(values)) if values else float("nan")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("bench_json")
    args = ap.parse_args(argv)
    with open(args.bench_json) as f:
        data = json.load(f)
    per_op = {}
    print(f"{'case':40s} {'op':14s} {'vs PyTorch':>10s} {'PyTorch / floor':>15s}")
    for r in data["results"]:
        op = r["op"]
        if not r.get("torch_s") or not r.get("copy_s") or not r.get("fastbn_s"):
            continue
        # copy_s moves 2 bytes per tensor byte (read and write)
        floor = r["copy_s"] * FLOOR_BYTES[op] / 2
        ceiling = r["torch_s"] / floor
        per_op.setdefault(op, []).append((r["speedup_vs_torch"], ceiling))
        print(f"{r['label']:40s} {OP_TITLES[op]:14s} {r['speedup_vs_torch']:9.2f}x "
              f"{ceiling:14.2f}x")
    print()
    print(f"{'geometric mean':14s} {'cases':>5s} {'vs PyTorch':>10s} {'ceiling':>8s}")
    for op, pairs in per_op.items():
        print(f"{OP_TITLES[op]:14s} {len(pairs):5d} {geomean([s for s, _ in pairs]):9.2f}x "
              f"{geomean([c for _, c in pairs]):7.2f}x")


if __name__ == "__main__":
    main()
