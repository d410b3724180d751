"""The public shape suite (shared/PERFORMANCE.md) and the ``--shapes`` parser.

One list feeds the bench CLI, the asv suite (``benchmarks/``) and the pytest-benchmark tests, so a
shape added here shows up everywhere. Each entry is (name, shape, channel axis, dtype).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np

__all__ = [
    "ShapeSpec",
    "SUITE",
    "SUITE_BY_NAME",
    "QUICK",
    "OPS",
    "OP_BYTES",
    "DTYPES",
    "parse_shapes",
    "parse_ops",
    "parse_dtype",
    "scaled",
]


@dataclass(frozen=True)
class ShapeSpec:
    """One benchmark tensor: ``shape`` with channels on ``axis``, elements of ``dtype``."""

    name: str
    shape: tuple[int, ...]
    axis: int
    dtype: str = "float32"

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def channel_axis(self) -> int:
        """``axis`` normalised to ``0 <= axis < ndim``."""
        return self.axis % self.ndim

    @property
    def channels(self) -> int:
        return self.shape[self.channel_axis]

    @property
    def reduce_axes(self) -> tuple[int, ...]:
        return tuple(i for i in range(self.ndim) if i != self.channel_axis)

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        """B, the bytes of one tensor of this shape: the unit of the roofline."""
        return self.size * np.dtype(self.dtype).itemsize

    @property
    def channels_last(self) -> bool:
        """Channels on the last axis of a >2-D tensor (NHWC-style), the other kernel family."""
        return self.ndim > 2 and self.channel_axis == self.ndim - 1

    def label(self) -> str:
        dims = ",".join(str(d) for d in self.shape)
        short = {"float32": "f32", "float64": "f64"}.get(self.dtype, self.dtype)
        return f"{self.name} ({dims}) ax{self.axis} {short}"

    def with_dtype(self, dtype: str | None) -> "ShapeSpec":
        return self if dtype is None or dtype == self.dtype else replace(self, dtype=dtype)

    def as_dict(self) -> dict:
        return {
            "name": self.name,
            "shape": list(self.shape),
            "axis": self.axis,
            "dtype": self.dtype,
            "nbytes": self.nbytes,
        }


# The public shape suite: keep in step with shared/PERFORMANCE.md.
SUITE: tuple[ShapeSpec, ...] = (
    ShapeSpec("resnet_56", (32, 64, 56, 56), 1, "float32"),
    ShapeSpec("resnet_14", (32, 256, 14, 14), 1, "float32"),
    ShapeSpec("resnet_7_wide", (32, 2048, 7, 7), 1, "float32"),
    ShapeSpec("image_c3", (64, 3, 224, 224), 1, "float32"),
    ShapeSpec("mlp", (256, 1024), 1, "float32"),
    ShapeSpec("mlp_f64", (256, 1024), 1, "float64"),
    ShapeSpec("edge_n1", (1, 64, 112, 112), 1, "float32"),
    ShapeSpec("edge_n1_late", (1, 512, 7, 7), 1, "float32"),
    ShapeSpec("nhwc", (32, 56, 56, 64), -1, "float32"),
    ShapeSpec("nhwc_c3", (64, 224, 224, 3), -1, "float32"),
    ShapeSpec("seq_ncl", (32, 128, 512), 1, "float32"),
    ShapeSpec("video_ncdhw", (4, 32, 16, 56, 56), 1, "float32"),
    ShapeSpec("large", (128, 256, 28, 28), 1, "float32"),
)
SUITE_BY_NAME: dict[str, ShapeSpec] = {s.name: s for s in SUITE}

# ``--quick``: one shape per kernel family, small enough for CI (channel-contiguous 2-D, a
# channels-first image with N=1, channels-last NHWC).
QUICK: tuple[str, ...] = ("mlp", "edge_n1_late", "edge_n1", "nhwc")

OPS: tuple[str, ...] = ("train", "infer", "backward", "stats")
OP_TITLES = {
    "train": "forward-train",
    "infer": "inference",
    "backward": "backward",
    "stats": "channel stats",
}
# Bytes that must move, in units of B (one tensor): see the roofline table in PERFORMANCE.md.
OP_BYTES = {"infer": 2, "train": 3, "backward": 5, "stats": 1}
DTYPES = ("float32", "float64")

_DTYPE_ALIASES = {
    "float32": "float32",
    "f32": "float32",
    "single": "float32",
    "float64": "float64",
    "f64": "float64",
    "double": "float64",
}


def parse_dtype(text: str) -> str:
    try:
        return _DTYPE_ALIASES[text.strip().lower()]
    except KeyError:
        raise ValueError(f"unknown dtype {text!r}: use float32 or float64") from None


def parse_ops(text: str | None) -> tuple[str, ...]:
    """``"train,stats"`` -> ``("train", "stats")``; ``None`` or ``"all"`` -> every op."""
    if text is None or text.strip().lower() in ("", "all"):
        return OPS
    aliases = {"forward": "train", "fwd": "train", "inference": "infer", "eval": "infer",
               "bwd": "backward", "grad": "backward", "stat": "stats", "channel_stats": "stats"}
    ops = []
    for tok in text.split(","):
        tok = tok.strip().lower()
        if not tok:
            continue
        tok = aliases.get(tok, tok)
        if tok not in OPS:
            raise ValueError(f"unknown op {tok!r}: choose from {', '.join(OPS)}")
        if tok not in ops:
            ops.append(tok)
    if not ops:
        raise ValueError("--ops is empty")
    return tuple(ops)


def _adhoc(dims: list[str], axis_text: str | None, dtype_text: str | None,
           spec_text: str) -> ShapeSpec:
    try:
        shape = tuple(int(d) for d in dims)
    except ValueError:
        raise ValueError(f"bad ad-hoc shape {spec_text!r}: dimensions must be integers") from None
    if not 2 <= len(shape) <= 5 or any(d <= 0 for d in shape):
        raise ValueError(
            f"bad ad-hoc shape {spec_text!r}: need 2 to 5 positive dimensions (N, C, ...), "
            "e.g. 8,16,32,32:1"
        )
    axis = 1
    if axis_text is not None and axis_text.strip():
        try:
            axis = int(axis_text)
        except ValueError:
            raise ValueError(f"bad axis in {spec_text!r}: expected an integer after ':'") from None
    if not -len(shape) <= axis < len(shape):
        raise ValueError(f"axis {axis} out of range for the {len(shape)}-D shape {spec_text!r}")
    dtype = parse_dtype(dtype_text) if dtype_text else "float32"
    name = "x".join(str(d) for d in shape)
    return ShapeSpec(name, shape, axis, dtype)


def parse_shapes(text: str | None, *, quick: bool = False) -> list[ShapeSpec]:
    """Parse ``--shapes``.

    Accepts suite names and ad-hoc shapes, comma-separated and freely mixed:
    ``resnet_56,mlp``, ``8,16,32,32:1``, ``8,16,32,32:-1:float64,mlp``. An ad-hoc shape is a run of
    integers closed by ``:axis`` (optionally ``:dtype``); a run with no ``:axis`` means axis 1.
    ``;`` also separates entries. ``all`` is the whole suite, ``quick`` the CI subset.
    """
    if text is None or not text.strip():
        names = QUICK if quick else tuple(s.name for s in SUITE)
        return [SUITE_BY_NAME[n] for n in names]
    out: list[ShapeSpec] = []
    pending: list[str] = []  # integers of an ad-hoc shape still open

    def flush(axis_text=None, dtype_text=None):
        if pending:
            spec_text = ",".join(pending) + (f":{axis_text}" if axis_text is not None else "")
            out.append(_adhoc(list(pending), axis_text, dtype_text, spec_text))
            pending.clear()

    for entry in text.split(";"):
        for tok in entry.split(","):
            tok = tok.strip()
            if not tok:
                continue
            head, *rest = tok.split(":")
            head = head.strip()
            if head.lstrip("-").isdigit():
                pending.append(head)
                if rest:
                    if len(rest) > 2:
                        raise ValueError(f"bad ad-hoc shape near {tok!r}: use N,C,H,W:axis[:dtype]")
                    flush(rest[0], rest[1] if len(rest) == 2 else None)
                continue
            flush()
            low = head.lower()
            if low == "all":
                out.extend(SUITE)
            elif low == "quick":
                out.extend(SUITE_BY_NAME[n] for n in QUICK)
            elif head in SUITE_BY_NAME:
                spec = SUITE_BY_NAME[head]
                if rest:  # e.g. resnet_56:float64
                    if len(rest) != 1:
                        raise ValueError(f"bad shape entry {tok!r}: use NAME or NAME:dtype")
                    spec = spec.with_dtype(parse_dtype(rest[0]))
                out.append(spec)
            else:
                raise ValueError(
                    f"unknown shape {tok!r}: use suite names ({', '.join(SUITE_BY_NAME)}), "
                    "'all', 'quick', or an ad-hoc shape such as 8,16,32,32:1 (add :float64 for "
                    "double)"
                )
        flush()
    if not out:
        raise ValueError("--shapes is empty")
    # Drop exact repeats but keep the order the user gave.
    seen, unique = set(), []
    for s in out:
        if s not in seen:
            seen.add(s)
            unique.append(s)
    return unique


def scaled(spec: ShapeSpec, max_elements: int = 1 << 15) -> ShapeSpec:
    """A small copy of ``spec`` (same rank, axis, dtype and channel count where possible).

    Used where a test must run every suite shape in milliseconds (pytest-benchmark under
    ``--benchmark-disable``). Halves the largest non-channel dimension, then the channels, until the
    tensor has at most ``max_elements`` elements.
    """
    shape = list(spec.shape)
    ax = spec.channel_axis
    while math.prod(shape) > max_elements:
        others = [i for i in range(len(shape)) if i != ax and shape[i] > 1]
        if others:
            i = max(others, key=lambda j: shape[j])
            shape[i] = max(1, shape[i] // 2)
        elif shape[ax] > 1:
            shape[ax] = max(1, shape[ax] // 2)
        else:
            break
    return replace(spec, shape=tuple(shape))
