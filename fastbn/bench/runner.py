"""``python -m fastbn bench``: fastbn against PyTorch, NumPy (and ONNX Runtime) on the shape suite.

Method (shared/PERFORMANCE.md):

* Every contender is called once untimed first (fastbn compiles on its first call), then timed
  calls run in rounds -- fastbn, PyTorch, NumPy, [ONNX Runtime,] copy, each once, in an order
  shuffled every round (seeded) -- so machine drift hits every contender alike, and so does the
  state the previous contender leaves (its data evicting ours from the cache, a core it left
  idle, its thread pool still spinning). Medians are reported.
* The number of timed calls adapts to a time budget: each contender gets
  ``clamp(budget / warm time, min_repeat, repeat)`` calls, so small shapes get many samples and
  slow baselines do not blow the run time.
* The roofline is a parallel copy of the same tensor timed in the same rounds: an op that must move
  k·B bytes (2 inference, 3 forward-train, 5 backward, 1 stats) has roofline time
  ``copy × k / 2``; roofline fraction = roofline time / fastbn time (1.0 = at the memory limit;
  tensors that fit in cache can exceed it).
* Every contender's first result is checked against NumPy with float64 reductions, so a fast wrong
  answer cannot pass unnoticed (fastbn disagreeing makes the exit status 1).

Caveats worth knowing when reading the numbers:

* PyTorch ships its own libgomp and Numba's ``omp`` layer uses the system one, so two OpenMP pools
  share the cores: a parallel call that starts while the previous contender's workers still spin
  loses ~10-20% (resnet_56 forward-train, 2 threads). Each timed call is therefore preceded by
  one untimed call of the same contender, which absorbs the hand-over.
* A parallel kernel stalls at each barrier for a scheduler time slice (milliseconds) whenever
  another process holds one of its cores. The run records how much CPU other processes used
  (``machine.load`` in the JSON) and warns above 10%.
"""

from __future__ import annotations

import argparse
import functools
import gc
import json
import math
import os
import random
import shlex
import statistics
import sys
import time
from dataclasses import dataclass, field

import numpy as np

from . import suite as _suite
from .contenders import (EPS, TITLES, Unavailable, compare, make_inputs, prepare, reference, tolerance,
                         torch_layout)
from .suite import OP_BYTES, OP_TITLES, ShapeSpec

__all__ = ["main", "build_parser", "run", "CaseResult", "format_table", "to_json"]

DEFAULT_REPEAT = 100
DEFAULT_BUDGET = 0.2
QUICK_REPEAT = 10
QUICK_BUDGET = 0.03
MIN_REPEAT = 3
MIN_PAIRS = 8  # rounds needed before the spread of per-round ratios says anything
JSON_FORMAT = 1
NOISY_LOAD = 0.10  # warn when other processes used more than this share of the CPUs

_EPILOG = """\
examples:
  python -m fastbn bench                          # the whole suite, every op (~2-3 min on 2 cores)
  python -m fastbn bench --quick                  # CI subset, well under 30 s
  python -m fastbn bench --shapes resnet_56,nhwc --ops train,backward --threads 1
  python -m fastbn bench --shapes 8,16,32,32:1,64,3,224,224:1:float64
  python -m fastbn bench --json bench.json --plot bench.png
  python scripts/make_readme_table.py bench.json  # markdown table for the README

shapes: suite names (see --list), 'all', 'quick', or ad-hoc N,C,H,W:axis[:dtype]; entries are
comma-separated and may be mixed (an ad-hoc shape is a run of integers closed by ':axis').
"""


class BenchError(Exception):
    """A user-facing error: printed as 'fastbn bench: error: ...' with exit status 2."""


# --------------------------------------------------------------------------------------------------
# Command line


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m fastbn bench",
        description="Time fastbn against PyTorch, NumPy (and ONNX Runtime) on the public shape\n"
        "suite, with each op's fraction of the memory-bandwidth roofline.",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--threads", type=int, metavar="N",
                   help="threads for fastbn, the copy, PyTorch and ONNX Runtime (default: "
                        "fastbn's current setting, i.e. all cores unless NUMBA_NUM_THREADS)")
    p.add_argument("--shapes", action="append", metavar="LIST",
                   help="suite names and/or ad-hoc N,C,H,W:axis[:dtype] shapes, comma-separated "
                        "(default: the whole suite; with --quick: %s)" % ",".join(_suite.QUICK))
    p.add_argument("--ops", metavar="LIST",
                   help="comma-separated subset of %s (default: all)" % ",".join(_suite.OPS))
    p.add_argument("--dtype", metavar="DTYPE",
                   help="float32 or float64: override every shape's dtype")
    p.add_argument("--repeat", type=int, metavar="N",
                   help=f"at most N timed calls per contender per case (default {DEFAULT_REPEAT}; "
                        f"{QUICK_REPEAT} with --quick); fewer when --budget is used up, never "
                        f"fewer than {MIN_REPEAT} (or N if smaller)")
    p.add_argument("--budget", type=float, metavar="SECONDS",
                   help=f"time to spend per contender per case (default {DEFAULT_BUDGET}; "
                        f"{QUICK_BUDGET} with --quick)")
    p.add_argument("--quick", action="store_true",
                   help="a small subset with a small budget, for CI (under 30 s)")
    p.add_argument("--json", metavar="PATH", help="write every figure plus machine info as JSON")
    p.add_argument("--plot", metavar="PATH",
                   help="write a PNG chart of speedups and roofline fractions (needs matplotlib)")
    p.add_argument("--out", action="store_true", dest="preallocate",
                   help="let fastbn write into a preallocated out= buffer (the other contenders "
                        "always allocate)")
    p.add_argument("--no-torch", action="store_true", help="leave PyTorch out even if installed")
    p.add_argument("--no-onnx", action="store_true",
                   help="leave ONNX Runtime out even if installed")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    p.add_argument("--seed", type=int, default=0, help="seed for the random inputs (default 0)")
    p.add_argument("--list", action="store_true", help="print the shape suite and exit")
    return p


@dataclass
class Options:
    shapes: list
    ops: tuple
    threads: int | None
    repeat: int
    budget: float
    quick: bool
    json_path: str | None
    plot_path: str | None
    preallocate: bool
    torch: bool
    onnx: bool
    progress: bool
    seed: int
    argv: list = field(default_factory=list)


def parse_options(argv: list[str]) -> Options:
    args = build_parser().parse_args(argv)
    if args.list:
        raise _ListSuite()
    try:
        text = ";".join(args.shapes) if args.shapes else None
        shapes = _suite.parse_shapes(text, quick=args.quick)
        ops = _suite.parse_ops(args.ops)
        dtype = _suite.parse_dtype(args.dtype) if args.dtype else None
    except ValueError as exc:
        raise BenchError(str(exc)) from None
    if dtype:
        shapes = list(dict.fromkeys(s.with_dtype(dtype) for s in shapes))
    repeat, budget = args.repeat, args.budget
    if repeat is None:
        repeat = QUICK_REPEAT if args.quick else DEFAULT_REPEAT
    if budget is None:
        budget = QUICK_BUDGET if args.quick else DEFAULT_BUDGET
    if repeat < 1:
        raise BenchError(f"--repeat must be at least 1, got {repeat}")
    if not 0 <= budget <= MAX_BUDGET:  # also refuses NaN and inf
        raise BenchError(f"--budget must be between 0 and {MAX_BUDGET:g} seconds, got {budget}")
    if args.seed < 0:
        raise BenchError(f"--seed must be a non-negative integer, got {args.seed}")
    if args.threads is not None:
        if args.threads < 1:
            raise BenchError(f"--threads must be at least 1, got {args.threads}")
        import numba

        top = numba.config.NUMBA_NUM_THREADS
        if args.threads > top:
            raise BenchError(
                f"--threads {args.threads}: Numba was started with at most {top} threads "
                f"(NUMBA_NUM_THREADS); set NUMBA_NUM_THREADS={args.threads} to allow more")
    plot = args.plot
    if plot:
        try:
            from matplotlib.backend_bases import FigureCanvasBase
        except ImportError:
            raise BenchError(
                "--plot needs matplotlib, which is not installed: pip install matplotlib "
                "(or pip install 'fastbn[bench]')") from None
        ext = os.path.splitext(plot)[1].lower().lstrip(".")
        if not ext:
            plot += ".png"  # what matplotlib would write; say so in "wrote ..."
        elif ext not in FigureCanvasBase.get_supported_filetypes():
            raise BenchError(f"--plot {plot}: matplotlib cannot write .{ext} files; use .png, "
                             ".svg or .pdf")
    for path, flag in ((args.json, "--json"), (plot, "--plot")):
        if path:
            _check_writable(path, flag)
    _check_memory(shapes)
    return Options(
        shapes=shapes, ops=ops, threads=args.threads, repeat=repeat, budget=budget,
        quick=args.quick, json_path=args.json, plot_path=plot,
        preallocate=args.preallocate, torch=not args.no_torch, onnx=not args.no_onnx,
        progress=not args.no_progress, seed=args.seed, argv=list(argv),
    )


class _ListSuite(Exception):
    pass


MAX_BUDGET = 3600.0  # seconds per contender per case: beyond is surely a typo


def _check_writable(path: str, flag: str) -> None:
    """Refuse an output path that cannot be written before the run, not after it."""
    full = os.path.abspath(path)
    parent = os.path.dirname(full)
    if not os.path.isdir(parent):
        raise BenchError(f"{flag} {path}: directory {parent} does not exist")
    if os.path.isdir(full):
        raise BenchError(f"{flag} {path} is a directory; give a file name")
    if not os.access(parent, os.W_OK) or (os.path.exists(full) and not os.access(full, os.W_OK)):
        raise BenchError(f"{flag} {path}: not writable")


# arrays of the tensor's size alive at once during a case: x, dy, the copy's destination, each
# contender's output, the float64 reference and its temporaries
_ARRAYS_PER_CASE = 8


def _check_memory(shapes: list) -> None:
    """Refuse shapes whose inputs and outputs cannot fit in this machine's memory."""
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return
    for spec in shapes:
        need = spec.nbytes * _ARRAYS_PER_CASE * (2 if spec.dtype == "float32" else 1)
        if need > total:
            raise BenchError(f"shape {spec.label()} needs about {need / 2**30:.1f} GiB for its "
                             f"inputs, outputs and float64 reference; this machine has "
                             f"{total / 2**30:.1f} GiB")


def _print_suite() -> None:
    print(f"{'name':<14} {'shape':<22} {'axis':>4}  dtype     MiB   quick")
    for s in _suite.SUITE:
        q = "yes" if s.name in _suite.QUICK else ""
        mib = s.nbytes / 2**20
        print(f"{s.name:<14} {str(s.shape):<22} {s.axis:>4}  {s.dtype:<8} {mib:5.1f}   {q}")


# --------------------------------------------------------------------------------------------------
# Progress


class _SimpleBar:
    """A stderr progress bar for when tqdm is not installed (tqdm is not a core dependency)."""

    def __init__(self, total: int, stream=None):
        self.total, self.n, self.stream = total, 0, stream or sys.stderr
        self.tty = getattr(self.stream, "isatty", lambda: False)()
        self.t0 = time.perf_counter()
        self.desc = ""

    def set_description(self, desc: str) -> None:
        self.desc = desc
        if self.tty:
            self._draw()

    def update(self, k: int = 1) -> None:
        self.n += k
        self._draw(final_line=not self.tty)

    def _draw(self, final_line: bool = False) -> None:
        width = 28
        filled = int(width * self.n / max(self.total, 1))
        bar = "#" * filled + "." * (width - filled)
        msg = f"[{bar}] {self.n}/{self.total} {time.perf_counter() - self.t0:5.1f}s {self.desc}"
        if self.tty:
            self.stream.write("\r" + msg[:120].ljust(120))
        else:
            self.stream.write(msg + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()


class _NoBar:
    def set_description(self, desc):
        pass

    def update(self, k=1):
        pass

    def close(self):
        pass


def _progress(total: int, enabled: bool):
    if not enabled:
        return _NoBar()
    try:
        from tqdm import tqdm
    except ImportError:
        return _SimpleBar(total)
    return tqdm(total=total, file=sys.stderr, unit="case", dynamic_ncols=True,
                bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}<{remaining}]")


# --------------------------------------------------------------------------------------------------
# Timing


@dataclass
class CaseResult:
    spec: ShapeSpec
    op: str
    samples: dict = field(default_factory=dict)   # contender -> list of seconds
    skipped: dict = field(default_factory=dict)   # contender -> reason
    errors: dict = field(default_factory=dict)    # contender -> exception text
    check: dict = field(default_factory=dict)     # contender -> max relative diff vs NumPy
    notes: dict = field(default_factory=dict)     # contender -> layout / settings note
    warm_s: dict = field(default_factory=dict)    # contender -> first (untimed) call in seconds

    def median(self, name: str) -> float | None:
        s = self.samples.get(name)
        return statistics.median(s) if s else None

    @property
    def bytes_moved(self) -> int:
        return OP_BYTES[self.op] * self.spec.nbytes

    @property
    def roofline_s(self) -> float | None:
        c = self.median("copy")
        return None if c is None else c * OP_BYTES[self.op] / 2

    @property
    def roofline_fraction(self) -> float | None:
        r, f = self.roofline_s, self.median("fastbn")
        return None if r is None or not f else r / f

    def speedup(self, peer: str) -> float | None:
        f, p = self.median("fastbn"), self.median(peer)
        return None if not f or p is None else p / f

    def ratio_quartiles(self, peer: str) -> tuple[float, float] | None:
        """Lower and upper quartile of ``peer time / fastbn time`` over the rounds that timed
        both: their calls ran in the same round, so drift of the machine between rounds cancels
        and the spread left is the noise that a single ratio of medians hides."""
        f, p = self.samples.get("fastbn"), self.samples.get(peer)
        if not f or not p:
            return None
        ratios = [b / a for a, b in zip(f, p) if a > 0]  # sample i of each comes from round i
        if len(ratios) < MIN_PAIRS:
            return None
        q1, _, q3 = statistics.quantiles(ratios, n=4)
        return q1, q3

    def standing(self, peer: str) -> str | None:
        """``"ahead"`` or ``"behind"`` where the middle half of the per-round ratios lies on one
        side of 1, ``"tie"`` where it straddles 1 (a difference within this run's noise)."""
        q = self.ratio_quartiles(peer)
        if q is None:
            return None
        return "ahead" if q[0] > 1.0 else "behind" if q[1] < 1.0 else "tie"

    def check_failed(self, name: str) -> bool:
        d = self.check.get(name)
        return d is not None and not d <= tolerance(self.spec.dtype)


def _time_round_robin(fns: dict, *, budget: float, repeat: int, result: CaseResult) -> dict:
    """Warm every callable up, then time them interleaved. Returns each one's first result."""
    first: dict = {}
    per_call: dict = {}
    for name, fn in list(fns.items()):
        try:
            t0 = time.perf_counter()
            first[name] = fn()
            t1 = time.perf_counter()
            # The first call may compile or fault in pages; a second one estimates the steady
            # cost (a first call's compile time must not shrink the number of timed calls).
            t2 = time.perf_counter()
            r = fn()
            est = time.perf_counter() - t2
            del r
        except Exception as exc:  # a contender failing must not take the whole run down
            result.errors[name] = f"{type(exc).__name__}: {exc}"
            del fns[name]
            continue
        result.warm_s[name] = t1 - t0
        per_call[name] = max(est, 1e-9)
    lo = min(MIN_REPEAT, repeat)
    counts = {n: max(lo, min(repeat, math.ceil(budget / t))) for n, t in per_call.items()}
    samples = {n: [] for n in fns}
    clock = time.perf_counter
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        order = list(fns)
        shuffle = random.Random(0).shuffle  # seeded: a rerun times in the same orders
        for rnd in range(max(counts.values(), default=0)):
            # A new order every round: a call runs faster right after one that left its data in
            # cache and both cores awake than after one that flushed the cache, left a core idle
            # or left its own thread pool spinning, so a fixed order (or a rotation of it, which
            # keeps every neighbour) would favour whoever always follows the same contender.
            shuffle(order)
            for name in order:
                fn = fns[name]
                if rnd >= counts[name]:
                    continue
                # One untimed call first: it absorbs the hand-over from the previous contender
                # (the other OpenMP pool still spinning, caches holding its data), so the timed
                # call measures this contender in steady state, as a user's loop would see it.
                del_r = fn()
                del del_r
                t0 = clock()
                r = fn()
                t = clock() - t0
                del r  # freeing the output is not timed, for any contender
                samples[name].append(t)
    finally:
        if gc_was_enabled:
            gc.enable()
    result.samples.update(samples)
    return first


# --------------------------------------------------------------------------------------------------
# The run


@dataclass
class RunResult:
    options: Options
    cases: list
    machine: dict
    peers: dict          # contender -> None (available) or reason it is missing
    threads: int
    elapsed_s: float
    started: str
    skipped: list = field(default_factory=list)  # (spec, op, reason): cases not run at all


# Training needs two values per channel or more: fastbn refuses fewer with a ValueError, as
# torch.nn.functional.batch_norm does, so such cases are left out rather than counted as
# failures (PyTorch's kernel and NumPy would still time a zero variance).
_NEEDS_TWO_VALUES = ("train", "backward")


def _not_applicable(spec, op) -> str | None:
    """Why ``op`` cannot be benchmarked on ``spec``, or None."""
    values = spec.size // spec.channels
    if op in _NEEDS_TWO_VALUES and values < 2:
        return (f"training needs more than one value per channel ({values} here); fastbn "
                "raises ValueError, as torch.nn.functional.batch_norm does")
    return None


def _setup_threads(fb, threads: int | None) -> int:
    import numba

    if threads is not None:  # at most NUMBA_NUM_THREADS: checked in parse_options
        setter = getattr(fb, "set_num_threads", None)
        if callable(setter):
            setter(threads)
        numba.set_num_threads(threads)  # the copy kernel runs on Numba's pool too
    getter = getattr(fb, "get_num_threads", None)
    n = getter() if callable(getter) else numba.get_num_threads()
    if n != numba.get_num_threads():  # keep the copy on the same number of threads as fastbn
        numba.set_num_threads(n)
    return int(n)


def run(opts: Options, *, log=None) -> RunResult:
    """Run the benchmark described by ``opts`` and return every figure."""
    log = log or (lambda msg: print(msg, file=sys.stderr))
    started = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    t_start = time.perf_counter()
    try:
        import fastbn as fb
    except ImportError as exc:
        raise BenchError(f"cannot import fastbn: {exc}") from None
    from ._copy import parallel_copy

    threads = _setup_threads(fb, opts.threads)
    from .machine import OtherLoad, machine_info

    load = OtherLoad().start()

    peers: dict = {}
    torch = None
    if opts.torch:
        try:
            import torch  # noqa: F811

            torch.set_num_threads(threads)
            peers["torch"] = None
        except ImportError as exc:
            peers["torch"] = f"PyTorch is not installed ({exc})"
    else:
        peers["torch"] = "left out (--no-torch)"
    if "infer" in opts.ops:
        if opts.onnx:
            try:
                import onnx  # noqa: F401
                import onnxruntime  # noqa: F401

                peers["onnxruntime"] = None
            except ImportError as exc:
                peers["onnxruntime"] = f"onnxruntime/onnx not installed ({exc})"
        else:
            peers["onnxruntime"] = "left out (--no-onnx)"
    contenders = ["fastbn"] + [p for p in ("torch",) if peers.get("torch") is None] + ["numpy"]
    if peers.get("onnxruntime") is None and "onnxruntime" in peers:
        contenders.append("onnxruntime")

    cases: list[CaseResult] = []
    skipped: list = []
    bar = _progress(len(opts.shapes) * len(opts.ops), opts.progress)
    try:
        for spec in opts.shapes:
            bar.set_description(f"{spec.name} inputs")
            try:
                inp = make_inputs(spec, seed=opts.seed, backward="backward" in opts.ops)
                x = inp["x"]
                dst = np.empty_like(x)
                dst.fill(0)  # touch the pages now, not in the first timed copy
            except MemoryError as exc:
                raise BenchError(f"not enough memory for the inputs of {spec.label()} "
                                 f"({exc})") from None
            copy_fn = functools.partial(parallel_copy, x, dst)
            fns = conv = None
            for op in opts.ops:
                reason = _not_applicable(spec, op)
                if reason:
                    skipped.append((spec, op, reason))
                    bar.update(1)
                    continue
                bar.set_description(f"{spec.name} {op}")
                res = CaseResult(spec, op)
                fns = {}
                conv = {}
                for name in contenders:
                    try:
                        p = prepare(name, op, spec, inp, threads=threads, out=opts.preallocate)
                    except Unavailable as exc:
                        res.skipped[name] = str(exc)
                        continue
                    except Exception as exc:
                        res.errors[name] = f"{type(exc).__name__}: {exc}"
                        continue
                    fns[name], conv[name] = p.fn, p.to_numpy
                    if p.note:
                        res.notes[name] = p.note
                fns["copy"] = copy_fn
                first = _time_round_robin(fns, budget=opts.budget, repeat=opts.repeat, result=res)
                _check(res, first, conv, inp)
                del first
                cases.append(res)
                bar.update(1)
            del inp, x, dst, copy_fn, fns, conv
            gc.collect()
    finally:
        bar.close()

    machine = machine_info(fastbn_module=fb, torch_module=torch)
    machine["load"] = load.stop()
    return RunResult(opts, cases, machine, peers, threads, time.perf_counter() - t_start, started,
                     skipped)


def _dx_scale(spec, inp: dict) -> float:
    """The scale of the backward pass's ``dx`` terms, ``max|dy| * max|weight * invstd|``: with
    few values per channel (2: ``dx`` is 0 but for ``eps``) the terms cancel and ``max|dx|`` is
    no measure of the rounding any float32 computation makes."""
    _, var = reference("stats", spec, inp)
    a = np.abs(inp["weight"].astype(np.float64)) / np.sqrt(var + EPS)
    return float(np.max(np.abs(inp["dy"]))) * float(np.max(a))


def _check(res: CaseResult, first: dict, conv: dict, inp: dict) -> None:
    """Compare every contender's first result with the float64-accumulating NumPy oracle."""
    ref = floors = None
    for name, out in first.items():
        if name == "copy" or name not in conv:
            continue
        try:
            if ref is None:
                ref = reference(res.op, res.spec, inp)
                if res.op == "backward":
                    floors = (_dx_scale(res.spec, inp), 0.0, 0.0)
            res.check[name] = compare(conv[name](out), ref, floors)
        except Exception as exc:
            res.errors[name] = f"result check failed: {type(exc).__name__}: {exc}"


# --------------------------------------------------------------------------------------------------
# Output


def fmt_time(seconds: float | None) -> str:
    """Milliseconds, or microseconds under 1 ms (per-call overhead dominates there)."""
    if seconds is None:
        return "-"
    if seconds < 1e-3:
        return f"{seconds * 1e6:.1f} us"
    return f"{seconds * 1e3:.2f} ms"


def _fmt_ratio(r: float | None, suffix: str = "x") -> str:
    if r is None:
        return "-"
    return f"{r:.2f}{suffix}" if r < 100 else f"{r:.0f}{suffix}"


def geomean(values) -> float | None:
    vals = [v for v in values if v is not None and v > 0 and math.isfinite(v)]
    if not vals:
        return None
    return math.exp(sum(math.log(v) for v in vals) / len(vals))


def summarize(cases: list) -> dict:
    """Per-op geometric means of the speedups and roofline fractions."""
    out = {}
    for op in _suite.OPS:
        cs = [c for c in cases if c.op == op and c.median("fastbn") is not None]
        if not cs:
            continue
        out[op] = {
            "cases": len(cs),
            "speedup_vs_torch": geomean(c.speedup("torch") for c in cs),
            "speedup_vs_numpy": geomean(c.speedup("numpy") for c in cs),
            "speedup_vs_onnxruntime": geomean(c.speedup("onnxruntime") for c in cs),
            "roofline_fraction": geomean(c.roofline_fraction for c in cs),
        }
    return out


def _table(headers, rows, align) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h)
              for i, h in enumerate(headers)]

    def line(cells):
        return "  ".join(c.ljust(w) if a == "<" else c.rjust(w)
                         for c, w, a in zip(cells, widths, align, strict=True)).rstrip()

    sep = "  ".join("-" * w for w in widths)
    return "\n".join([line(headers), sep] + [line(r) for r in rows])


def _torch_layout_note(cases) -> str | None:
    by_layout: dict = {}
    for c in cases:
        if c.spec.channel_axis != 1:
            by_layout.setdefault(torch_layout(c.spec)[1], []).append(c.spec.name)
    if not by_layout:
        return None
    parts = [f"{lay} for {', '.join(dict.fromkeys(names))}" for lay, names in by_layout.items()]
    return ("PyTorch layout for channels not on axis 1: " + "; ".join(parts)
            + " (the NumPy array's memory viewed through .permute, no copy)")


def format_table(rr: RunResult) -> str:
    cases = rr.cases
    has_torch = rr.peers.get("torch") is None
    has_ort = "onnxruntime" in rr.peers and rr.peers["onnxruntime"] is None
    headers = ["shape", "op", "fastbn", "PyTorch", "NumPy", "vs PyTorch", "vs NumPy", "roofline"]
    align = ["<", "<", ">", ">", ">", ">", ">", ">"]
    if has_ort:
        headers.append("ONNX RT")
        align.append(">")
    rows = []
    flagged = []
    last = None
    for c in cases:
        label = c.spec.label() if c.spec != last else ""
        last = c.spec
        cells = [label, OP_TITLES[c.op]]
        for name in ("fastbn", "torch", "numpy"):
            if name in c.errors:
                cell = "ERROR"
            elif name == "torch" and not has_torch:
                cell = "n/a"
            else:
                cell = fmt_time(c.median(name))
                if c.check_failed(name):
                    cell += " !"
                    flagged.append((c, name))
            cells.append(cell)
        tie = "~" if c.standing("torch") == "tie" else ""
        cells.append(tie + _fmt_ratio(c.speedup("torch")) if has_torch else "n/a")
        cells.append(_fmt_ratio(c.speedup("numpy")))
        rf = c.roofline_fraction
        cells.append("-" if rf is None else f"{rf:.2f}")
        if has_ort:
            if "onnxruntime" in c.errors:
                cells.append("ERROR")
            elif c.median("onnxruntime") is not None:
                cell = fmt_time(c.median("onnxruntime"))
                if c.check_failed("onnxruntime"):
                    cell += " !"
                    flagged.append((c, "onnxruntime"))
                cells.append(cell)
            else:
                cells.append("")
        rows.append(cells)
    out = [_table(headers, rows, align)]

    summ = summarize(cases)
    g_headers = ["geometric mean", "cases", "vs PyTorch", "vs NumPy", "roofline"]
    g_rows = []
    for op, s in summ.items():
        g_rows.append([OP_TITLES[op], str(s["cases"]),
                       _fmt_ratio(s["speedup_vs_torch"]) if has_torch else "n/a",
                       _fmt_ratio(s["speedup_vs_numpy"]),
                       "-" if s["roofline_fraction"] is None else f"{s['roofline_fraction']:.2f}"])
    out += ["", _table(g_headers, g_rows, ["<", ">", ">", ">", ">"])]

    notes = []
    if not has_torch:
        hint = ("" if not rr.options.torch else
                " Install it for the comparison: pip install 'fastbn[bench]'.")
        notes.append(f"PyTorch column missing: {rr.peers['torch']}.{hint}")
    else:
        notes.append("PyTorch: torch.ops.aten.native_batch_norm / native_batch_norm_backward "
                     "(kernels only, no autograd); stats: torch.var_mean(correction=0).")
        lay = _torch_layout_note(cases)
        if lay:
            notes.append(lay + ".")
    if "onnxruntime" in rr.peers:
        if has_ort:
            notes.append("ONNX RT: one-node BatchNormalization model, inference only, channels "
                         "on axis 1 only (blank for other axes), intra-op spinning off.")
        else:
            notes.append(f"ONNX RT column missing: {rr.peers['onnxruntime']}.")
    notes.append("times are medians of interleaved calls (in an order shuffled every round) "
                 "after an untimed warm-up call; "
                 "vs X = X time / fastbn time (>1: fastbn faster).")
    if has_torch:
        notes.append("~ marks a tie within this run's noise: the middle half of the per-round "
                     "ratios (fastbn and PyTorch timed in the same round) spans 1.0.")
        behind = [c for c in cases if c.standing("torch") == "behind"]
        if behind:
            notes.append("behind PyTorch beyond this run's noise (slower in three rounds of four "
                         "or more): " + "; ".join(f"{c.spec.name} {OP_TITLES[c.op]}"
                                               for c in behind) + ".")
    notes.append("roofline = parallel-copy time x bytes/2B (infer 2B, train 3B, backward 5B, "
                 "stats 1B); fraction = roofline / fastbn time (cache-resident tensors can "
                 "exceed 1).")
    if rr.options.preallocate:
        notes.append("fastbn wrote into preallocated out= buffers (--out).")
    others = rr.machine.get("load", {}).get("others_cpu_fraction")
    if others is not None and others > NOISY_LOAD:
        notes.append(f"! other processes used {others:.0%} of the CPUs during this run: parallel "
                     "code stalls at every barrier when a core is taken, so these timings are "
                     "unreliable. Rerun on an idle machine (or compare at --threads 1).")
    for c, name in flagged:
        notes.append(f"! {TITLES[name]} differs from the float64 reference on "
                     f"{c.spec.label()} {c.op}: "
                     f"max relative difference {c.check[name]:.2e} "
                     f"(tolerance {tolerance(c.spec.dtype):.0e}).")
    for spec, op, reason in rr.skipped:
        notes.append(f"left out {spec.label()} {OP_TITLES[op]}: {reason}.")
    for c in cases:
        for name, err in c.errors.items():
            notes.append(f"ERROR {TITLES.get(name, name)} on {c.spec.label()} {c.op}: {err}")
    m = rr.machine
    notes.append(
        f"machine: {m.get('cpu')}, {m.get('available_cores')} cores; threads {rr.threads} "
        f"(Numba threading layer {m.get('threading_layer')}); fastbn {m.get('fastbn')}, "
        f"numba {m.get('numba')}, numpy {m.get('numpy')}"
        + (f", torch {m['torch']}" if m.get("torch") else "")
        + (f", onnxruntime {m['onnxruntime']}" if has_ort and m.get("onnxruntime") else "")
        + f"; {len(cases)} cases in {rr.elapsed_s:.1f} s.")
    out += [""] + ["note: " + n if not n.startswith(("!", "ERROR")) else n for n in notes]
    return "\n".join(out)


def _num(v):
    if v is None:
        return None
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def command_line(argv: list[str]) -> str:
    return "python -m fastbn bench" + ("" if not argv else " " + shlex.join(argv))


def to_json(rr: RunResult) -> dict:
    """Every figure of the run, plus configuration and machine info (the ``--json`` document)."""
    o = rr.options
    results = []
    for c in rr.cases:
        times = {}
        for name, s in c.samples.items():
            if not s:
                continue
            times[name] = {
                "median_s": statistics.median(s),
                "min_s": min(s),
                "mean_s": statistics.fmean(s),
                "stdev_s": statistics.stdev(s) if len(s) > 1 else 0.0,
                "n": len(s),
                "warmup_s": c.warm_s.get(name),
                "samples_s": s,
            }
        results.append({
            "shape": c.spec.as_dict(),
            "label": c.spec.label(),
            "op": c.op,
            "bytes_moved": c.bytes_moved,
            "bytes_moved_per_B": OP_BYTES[c.op],
            "torch_layout": torch_layout(c.spec)[1] if "torch" in c.samples else None,
            "times": times,
            "fastbn_s": c.median("fastbn"),
            "torch_s": c.median("torch"),
            "numpy_s": c.median("numpy"),
            "onnxruntime_s": c.median("onnxruntime"),
            "copy_s": c.median("copy"),
            "speedup_vs_torch": _num(c.speedup("torch")),
            "speedup_vs_numpy": _num(c.speedup("numpy")),
            "speedup_vs_onnxruntime": _num(c.speedup("onnxruntime")),
            "speedup_vs_torch_quartiles": c.ratio_quartiles("torch"),
            "speedup_vs_onnxruntime_quartiles": c.ratio_quartiles("onnxruntime"),
            "standing_vs_torch": c.standing("torch"),
            "standing_vs_onnxruntime": c.standing("onnxruntime"),
            "roofline_s": c.roofline_s,
            "roofline_fraction": _num(c.roofline_fraction),
            "check_max_rel_diff": {k: _num(v) if v is not None and math.isfinite(v) else "inf"
                                   for k, v in c.check.items()},
            "check_ok": "fastbn" not in c.errors and not any(c.check_failed(n) for n in c.check),
            "skipped": c.skipped,
            "errors": c.errors,
            "notes": c.notes,
        })
    return {
        "format": JSON_FORMAT,
        "tool": "fastbn.bench",
        "command": command_line(o.argv),
        "argv": o.argv,
        "started": rr.started,
        "elapsed_s": rr.elapsed_s,
        "config": {
            "threads": rr.threads,
            "repeat": o.repeat,
            "min_repeat": MIN_REPEAT,
            "budget_s": o.budget,
            "quick": o.quick,
            "ops": list(o.ops),
            "shapes": [s.as_dict() for s in o.shapes],
            "preallocate_out": o.preallocate,
            "seed": o.seed,
            "eps": 1e-5,
        },
        "machine": rr.machine,
        "peers": {k: {"available": v is None, "reason": v} for k, v in rr.peers.items()},
        "method": {
            "timing": "untimed warm-up call, then timed calls in rounds, each contender once a "
                      "round in an order shuffled every round (seeded); medians",
            "quartiles": "of peer/fastbn per round (calls in the same round); standing: ahead or "
                         "behind where both quartiles lie on one side of 1, else tie",
            "torch": "torch.ops.aten.native_batch_norm / native_batch_norm_backward; "
                     "torch.var_mean(correction=0) for stats",
            "numpy": "plain vectorised NumPy",
            "copy": "numba parallel prange copy of the flat tensor into a preallocated buffer",
            "roofline": "copy_s * bytes_moved_per_B / 2; fraction = roofline_s / fastbn_s",
        },
        "results": results,
        "left_out": [{"shape": spec.as_dict(), "op": op, "reason": reason}
                     for spec, op, reason in rr.skipped],
        "geomean": summarize(rr.cases),
    }


def _write_json(doc: dict, path: str) -> None:
    tmp = path + ".tmp"
    try:
        with open(tmp, "w", encoding="utf-8") as fh:
            json.dump(doc, fh, indent=1, allow_nan=False, default=str)
            fh.write("\n")
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


# --------------------------------------------------------------------------------------------------
# Entry point


def main(argv: list[str] | None = None) -> int:
    """``python -m fastbn bench ARGS``; returns the exit status.

    0: ran, every fastbn result matched the float64 NumPy reference. 1: ran, but fastbn raised or
    disagreed with the reference somewhere (see the notes under the table). 2: bad arguments or
    fastbn cannot run.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        opts = parse_options(argv)
    except SystemExit as exc:  # argparse: --help, or a usage error it already printed
        return int(exc.code or 0) if not isinstance(exc.code, str) else 2
    except _ListSuite:
        _print_suite()
        return 0
    except BenchError as exc:
        print(f"fastbn bench: error: {exc}", file=sys.stderr)
        return 2

    print(f"fastbn bench: {len(opts.shapes)} shape(s) x {len(opts.ops)} op(s), "
          f"budget {opts.budget:g} s and at most {opts.repeat} timed calls per contender",
          flush=True)
    try:
        rr = run(opts)
    except BenchError as exc:
        print(f"fastbn bench: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("fastbn bench: interrupted", file=sys.stderr)
        return 130

    print(format_table(rr), flush=True)
    doc = None
    try:
        if opts.json_path:
            doc = to_json(rr)
            _write_json(doc, opts.json_path)
            print(f"wrote {opts.json_path}")
        if opts.plot_path:
            from .plot import plot_results

            plot_results(doc or to_json(rr), opts.plot_path)
            print(f"wrote {opts.plot_path}")
    except OSError as exc:
        print(f"fastbn bench: error: cannot write the results: {exc}", file=sys.stderr)
        return 2

    bad = [c for c in rr.cases if "fastbn" in c.errors or c.check_failed("fastbn")]
    if bad:
        print(f"fastbn bench: {len(bad)} case(s) where fastbn failed or disagreed with the "
              "float64 NumPy reference "
              "(see the notes above)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
