"""Where a tensor's channel axis goes through a row-major reshape, and what a Slice cuts from an
axis (shared by the shape and attention handlers and the normalization passes)."""

from __future__ import annotations

import numpy as np

__all__ = ["map_axis", "slice_bounds"]


def map_axis(in_shape, out_shape, axis):
    """Where channel axis ``axis`` of ``in_shape`` lands after a row-major reshape.

    Returns (out_axis, outer, inner): the output axis holds ``outer x C x inner`` entries per
    channel block, or None when the channels are split across output axes.
    """
    c = in_shape[axis]
    inner_in = int(np.prod(in_shape[axis + 1:], dtype=np.int64))
    for k in range(len(out_shape)):
        inner_out = int(np.prod(out_shape[k + 1:], dtype=np.int64))
        span = inner_out * out_shape[k]
        if inner_out <= inner_in and inner_in % inner_out == 0 and span >= inner_in * c and span % (inner_in * c) == 0:
            return k, span // (inner_in * c), inner_in // inner_out
    return None


def slice_bounds(inputs: list, rank: int, axis: int) -> tuple[int, int | None, int] | None:
    """(start, end, step) of a Slice along ``axis``, from the values of its starts, ends, axes and
    steps inputs (None for an absent axes or steps input: the defaults; for ends: unknown); None
    when the Slice leaves ``axis`` whole."""
    starts, ends, axes, steps = (None if v is None else np.asarray(v).reshape(-1).tolist() for v in inputs)
    axes = [int(a) % rank for a in axes] if axes is not None else list(range(len(starts)))
    if axis not in axes:
        return None
    k = axes.index(axis)
    return int(starts[k]), None if ends is None else int(ends[k]), 1 if steps is None else int(steps[k])
