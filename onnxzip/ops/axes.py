"""Where a tensor's channel axis goes through a row-major reshape (shared by the shape and
attention handlers)."""

from __future__ import annotations

import numpy as np

__all__ = ["map_axis"]


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
